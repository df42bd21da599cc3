use super::*;

fn sized(size: Option<u64>) -> Limits {
    Limits { size, max: None }
}
use futures_util::StreamExt;

fn chunks(data: &[u8], size: usize) -> Vec<Result<Bytes, FlightError>> {
    data.chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

async fn collect(mut body: BodyStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// A fresh store, its flights, and the leader's permit for `digest`.
fn lead(digest: &Digest) -> (tempfile::TempDir, Store, Flights, Permit) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let flights = Flights::default();
    let Role::Leader(permit) = flights.join(&store, "up", digest, "r") else {
        panic!("the first join leads")
    };
    (dir, store, flights, permit)
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn linked(_: &Store, _: u64) -> Result<(), StoreError> {
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_get_every_byte_and_the_blob_is_committed() {
    let body = data(3 * READ_CHUNK + 17);
    let digest = Digest::sha256_of(&body);
    let (_dir, store, flights, permit) = lead(&digest);
    let Role::Reader(reader) = flights.join(&store, "up", &digest, "r") else {
        panic!("second join reads")
    };
    let first = permit.flight().clone().read(0, None);
    let ranged = reader.clone().read(10, Some(20));
    let stream = futures_util::stream::iter(chunks(&body, 10_000));
    let size = Some(body.len() as u64);
    tokio::spawn(download(
        permit,
        store.clone(),
        sized(size),
        stream,
        Box::new(linked),
        WhenUnwanted::Finish,
    ));
    assert_eq!(collect(first).await.unwrap(), body);
    assert_eq!(collect(ranged).await.unwrap(), &body[10..20]);
    assert_eq!(reader.finished().await.unwrap(), body.len() as u64);
    assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), body);
    assert_eq!(flights.in_progress(), 0);
    // A reader arriving after the rename reads the final file.
    assert_eq!(collect(reader.read(0, None)).await.unwrap(), body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_digest_mismatch_fails_every_reader_and_keeps_nothing() {
    let body = data(200_000);
    let digest = Digest::sha256_of(b"something else");
    let (dir, store, _flights, permit) = lead(&digest);
    let reader = permit.flight().clone();
    let body_stream = reader.clone().read(0, None);
    let stream = futures_util::stream::iter(chunks(&body, 4096));
    download(
        permit,
        store.clone(),
        sized(None),
        stream,
        Box::new(linked),
        WhenUnwanted::Finish,
    )
    .await;
    let got = collect(body_stream).await;
    assert!(got.is_err(), "the body must end with an error, not cleanly");
    assert!(matches!(
        reader.finished().await,
        Err(FlightError::DigestMismatch { .. })
    ));
    assert!(!store.blob_path(&digest).exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_body_fails_even_with_the_right_prefix() {
    let body = data(100_000);
    let digest = Digest::sha256_of(&body);
    let (_dir, store, _flights, permit) = lead(&digest);
    let flight = permit.flight().clone();
    let mut parts = chunks(&body[..50_000], 4096);
    parts.push(Err(FlightError::Abandoned));
    download(
        permit,
        store.clone(),
        sized(Some(100_000)),
        futures_util::stream::iter(parts),
        Box::new(linked),
        WhenUnwanted::Finish,
    )
    .await;
    assert!(flight.finished().await.is_err());
    assert!(collect(flight.read(0, None)).await.is_err());
    assert!(!store.blob_path(&digest).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_permit_fails_the_flight_and_frees_the_digest() {
    let digest = Digest::sha256_of(b"x");
    let (_dir, store, flights, permit) = lead(&digest);
    let flight = permit.flight().clone();
    drop(permit);
    assert!(matches!(
        flight.started().await,
        Err(FlightError::Abandoned)
    ));
    assert!(matches!(
        flights.join(&store, "up", &digest, "r"),
        Role::Leader(_)
    ));
}

/// An upstream body that yields `chunks` pieces, each after `gate` lets it through.
fn gated(
    data: Vec<u8>,
    gate: tokio::sync::mpsc::Receiver<()>,
) -> impl Stream<Item = Result<Bytes, FlightError>> {
    futures_util::stream::unfold((data, 0usize, gate), |(data, pos, mut gate)| async move {
        if pos >= data.len() || gate.recv().await.is_none() {
            return None;
        }
        let end = (pos + 10_000).min(data.len());
        let chunk = Bytes::copy_from_slice(&data[pos..end]);
        Some((Ok(chunk), (data, end, gate)))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_reader_leaves_the_policy_decides_whether_the_download_finishes() {
    for policy in [WhenUnwanted::Finish, WhenUnwanted::Stop] {
        let body = data(100_000);
        let digest = Digest::sha256_of(&body);
        let (_dir, store, _flights, permit) = lead(&digest);
        let flight = permit.flight().clone();
        let (open, gate) = tokio::sync::mpsc::channel(1);
        let size = Some(body.len() as u64);
        let task = tokio::spawn(download(
            permit,
            store.clone(),
            sized(size),
            gated(body.clone(), gate),
            Box::new(linked),
            policy,
        ));
        open.send(()).await.unwrap();
        open.send(()).await.unwrap();
        // A client reads what is there, then hangs up.
        let mut reader = flight.clone().read(0, None);
        let first = reader.next().await.unwrap().unwrap();
        assert!(!first.is_empty());
        drop(reader);
        while flight.readers.load(Ordering::SeqCst) > 0 {
            tokio::task::yield_now().await;
        }
        // The rest of the body arrives with nobody reading.
        for _ in 0..10 {
            if open.send(()).await.is_err() {
                break;
            }
        }
        drop(open);
        task.await.unwrap();
        let outcome = flight.finished().await;
        match policy {
            WhenUnwanted::Finish => {
                assert_eq!(outcome.unwrap(), body.len() as u64);
                assert!(store.blob_path(&digest).exists());
            }
            WhenUnwanted::Stop => {
                assert!(matches!(outcome, Err(FlightError::Unwanted)));
                assert!(!store.blob_path(&digest).exists());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_past_its_cap_fails_even_without_a_length() {
    let body = data(50_000);
    let digest = Digest::sha256_of(&body);
    let (_dir, store, _flights, permit) = lead(&digest);
    let flight = permit.flight().clone();
    let limits = Limits {
        size: None,
        max: Some(10_000),
    };
    let stream = futures_util::stream::iter(chunks(&body, 4096));
    download(
        permit,
        store.clone(),
        limits,
        stream,
        Box::new(linked),
        WhenUnwanted::Finish,
    )
    .await;
    assert!(matches!(
        flight.finished().await,
        Err(FlightError::SizeMismatch {
            expected: 10_000,
            ..
        })
    ));
    assert!(!store.blob_path(&digest).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_range_read_ends_cleanly_only_after_the_digest_verified() {
    let body = data(200_000);
    let digest = Digest::sha256_of(b"not this body");
    let (_dir, store, _flights, permit) = lead(&digest);
    let ranged = permit.flight().clone().read(10, Some(20));
    let stream = futures_util::stream::iter(chunks(&body, 4096));
    download(
        permit,
        store.clone(),
        sized(None),
        stream,
        Box::new(linked),
        WhenUnwanted::Finish,
    )
    .await;
    assert!(
        collect(ranged).await.is_err(),
        "a range of a lying download must not end cleanly"
    );
}

#[test]
fn readers_waiting_do_not_starve_the_writer() {
    // A runtime whose blocking pool is all but full of readers parked on a
    // download: the writer runs on its own thread, so the download still ends.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let store = Store::open(dir.path()).unwrap();
        let flights = Flights::default();
        let body = data(8 * READ_CHUNK);
        let digest = Digest::sha256_of(&body);
        let Role::Leader(permit) = flights.join(&store, "up", &digest, "r") else {
            panic!()
        };
        let readers: Vec<_> = (0..2)
            .map(|_| permit.flight().clone().read(0, None))
            .collect();
        let stream = futures_util::stream::iter(chunks(&body, 256 * 1024));
        let task = tokio::spawn(download(
            permit,
            store.clone(),
            sized(Some(body.len() as u64)),
            stream,
            Box::new(linked),
            WhenUnwanted::Finish,
        ));
        let done = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            for r in readers {
                assert_eq!(collect(r).await.unwrap().len(), body.len());
            }
            task.await.unwrap();
        })
        .await;
        assert!(done.is_ok(), "the download and its readers finished");
    });
}

/// A resume that serves `body` from the offset asked for, or from 0 when
/// `ignore_range` (as a server that ignores `Range` does).
fn resume_from(body: Vec<u8>, ignore_range: bool, asked: Arc<Mutex<Vec<u64>>>) -> Resume {
    Arc::new(move |offset| {
        asked.lock().unwrap().push(offset);
        let from = if ignore_range { 0 } else { offset };
        let rest = body[from as usize..].to_vec();
        Box::pin(async move {
            Ok(Resumed {
                from,
                body: futures_util::stream::iter(chunks(&rest, 3000)).boxed(),
            })
        })
    })
}

fn failing_commit(store: &Store, _: u64) -> Result<(), StoreError> {
    Err(StoreError::Io {
        path: store.tmp_path(&Digest::sha256_of(b"x")),
        source: io::Error::new(io::ErrorKind::StorageFull, "no space left on device"),
    })
}

/// Runs a download whose disk side fails at the end, with readers attached.
async fn failing_on_our_side(
    body: &[u8],
    digest: &Digest,
    resume: Option<Resume>,
) -> (
    io::Result<Vec<u8>>,
    io::Result<Vec<u8>>,
    Store,
    tempfile::TempDir,
) {
    let (dir, store, _flights, permit) = lead(digest);
    if let Some(resume) = resume {
        permit.resume_with(resume);
    }
    let whole = permit.flight().clone().read(0, None);
    let ranged = permit.flight().clone().read(10, Some(5000));
    let stream = futures_util::stream::iter(chunks(body, 4096));
    download(
        permit,
        store.clone(),
        sized(Some(body.len() as u64)),
        stream,
        Box::new(failing_commit),
        WhenUnwanted::Finish,
    )
    .await;
    (collect(whole).await, collect(ranged).await, store, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_finish_from_upstream_when_our_disk_fails() {
    let body = data(2 * READ_CHUNK + 99);
    let digest = Digest::sha256_of(&body);
    for ignore_range in [false, true] {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let resume = resume_from(body.clone(), ignore_range, asked.clone());
        let (whole, ranged, store, _dir) = failing_on_our_side(&body, &digest, Some(resume)).await;
        assert_eq!(whole.unwrap(), body, "ignore_range={ignore_range}");
        assert_eq!(ranged.unwrap(), &body[10..5000]);
        assert!(!store.blob_path(&digest).exists(), "nothing kept");
        assert_eq!(asked.lock().unwrap().len(), 2, "one resume per reader");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_with_wrong_bytes_never_ends_cleanly() {
    let body = data(READ_CHUNK + 5);
    let digest = Digest::sha256_of(&body);
    let mut lie = body.clone();
    *lie.last_mut().unwrap() ^= 1;
    let resume = resume_from(lie, false, Arc::default());
    let (whole, ranged, _store, _dir) = failing_on_our_side(&body, &digest, Some(resume)).await;
    assert!(whole.is_err(), "a lying upstream fails the body");
    assert!(
        ranged.is_err(),
        "a range's last chunk waits for the verdict"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_resume_a_local_failure_fails_the_readers() {
    let body = data(READ_CHUNK + 5);
    let digest = Digest::sha256_of(&body);
    let (whole, ranged, _store, _dir) = failing_on_our_side(&body, &digest, None).await;
    assert!(whole.is_err() && ranged.is_err());
}
