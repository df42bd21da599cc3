//! Image lists as operators have them: plain reference lists and Kubernetes YAML.
