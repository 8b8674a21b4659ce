//! Reproducible, parallel gzip. The input is cut into fixed 1 MiB chunks,
//! each compressed on its own into raw deflate ending in a sync flush, and the
//! pieces are concatenated in order (pigz's `--independent` scheme). Because
//! the chunking is fixed, the output bytes do not depend on the thread count.
//! Header: no name, mtime 0, XFL 0, OS 255 (design §3).
//!
//! A 16 KiB piece whose bytes are spread so evenly that no entropy coder
//! could shrink it (random data, media, archives: see [`incompressible`]) is
//! written as stored deflate blocks instead: the same bytes every time, at
//! copy speed, instead of seconds of level-6 work that saves nothing. The
//! test is integer arithmetic on the chunk's byte histogram, so it decides
//! the same way on every machine.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use flate2::{Compress, Compression, FlushCompress};

/// The fixed compression level; changing it changes every layer digest.
pub(crate) const LEVEL: u32 = 6;
/// The fixed chunk size; changing it changes every layer digest.
pub(crate) const CHUNK: usize = 1 << 20;

/// A chunk and its position in the stream.
type Job = (u64, Vec<u8>);
/// A compressed chunk and its position.
type Done = (u64, io::Result<Vec<u8>>);

const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// How many of a compression's threads may take chunks now: a layer
/// compressed while the build goes on (the next step runs on its folder)
/// leaves a core to the build, and gets every core once the build waits
/// for it (two compressor threads beside a step's one serial chain of
/// maintainer scripts slowed both down on 2 cores).
#[derive(Debug)]
pub(crate) struct Gate {
    open: Mutex<usize>,
    moved: Condvar,
    /// How many threads deflate now, and the most seen at once (tests).
    #[cfg(test)]
    busy: (std::sync::atomic::AtomicUsize, std::sync::atomic::AtomicUsize),
}

impl Gate {
    pub(crate) fn new(open: usize) -> Arc<Gate> {
        Arc::new(Gate {
            open: Mutex::new(open.max(1)),
            moved: Condvar::new(),
            #[cfg(test)]
            busy: Default::default(),
        })
    }

    /// Lets `open` threads (at least one) take chunks.
    pub(crate) fn set(&self, open: usize) {
        *self.open.lock().expect("gate lock") = open.max(1);
        self.moved.notify_all();
    }

    /// Waits until thread `k` (from 0) may take a chunk.
    fn wait_turn(&self, k: usize) {
        let mut open = self.open.lock().expect("gate lock");
        while k >= *open {
            open = self.moved.wait(open).expect("gate lock");
        }
    }
}

/// Compresses what `produce` writes into gzip on `out`, using `threads`
/// compressor threads. Returns `out` and what `produce` returned.
pub(crate) fn compress<W, R, F>(out: W, threads: usize, produce: F) -> io::Result<(W, R)>
where
    W: Write + Send,
    F: FnOnce(&mut dyn Write) -> io::Result<R>,
{
    compress_gated(out, threads, None, produce)
}

/// [`compress`], with at most as many threads at work as `gate` lets
/// (all of them once `produce` is done). The bytes are the same.
pub(crate) fn compress_gated<W, R, F>(
    mut out: W,
    threads: usize,
    gate: Option<&Arc<Gate>>,
    produce: F,
) -> io::Result<(W, R)>
where
    W: Write + Send,
    F: FnOnce(&mut dyn Write) -> io::Result<R>,
{
    out.write_all(&HEADER)?;
    let threads = threads.max(1);
    let (job_tx, job_rx) = sync_channel::<Job>(threads * 2);
    let (done_tx, done_rx) = sync_channel::<Done>(threads * 2);
    let job_rx = Arc::new(Mutex::new(job_rx));

    thread::scope(|s| {
        for k in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            let gate = gate.cloned();
            s.spawn(move || worker(rx, tx, gate.map(|g| (g, k))));
        }
        drop(done_tx);
        let sink = s.spawn(move || -> io::Result<W> {
            let mut pending: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut next = 0u64;
            let mut failed: Option<io::Error> = None;
            for (seq, piece) in done_rx {
                match piece {
                    Ok(p) => {
                        pending.insert(seq, p);
                    }
                    Err(e) => failed = failed.or(Some(e)),
                }
                while let Some(p) = pending.remove(&next) {
                    if failed.is_none() {
                        if let Err(e) = out.write_all(&p) {
                            failed = Some(e);
                        }
                    }
                    next += 1;
                }
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(out),
            }
        });

        // Dropped after the chunker (which closes the queue), even when
        // `produce` panics: no thread is left held at the gate.
        let open_at_end = OpenAtEnd(gate, threads);
        let mut chunker = Chunker {
            tx: Some(job_tx),
            buf: Vec::with_capacity(CHUNK),
            seq: 0,
            crc: crc32fast::Hasher::new(),
            len: 0,
        };
        let produced = produce(&mut chunker);
        let flushed = chunker.flush_chunk();
        let (crc, len) = (chunker.crc.clone().finalize(), chunker.len);
        chunker.tx = None; // closes the job queue: workers finish, then the sink
        drop(open_at_end); // the last chunks on every thread; a held thread sees the queue closed
        let out = sink.join().expect("gzip sink thread panicked");
        // A failed write is the root cause when the producer only saw the queue close.
        let mut out = out?;
        let r = produced?;
        flushed?;
        out.write_all(&final_block())?;
        out.write_all(&crc.to_le_bytes())?;
        out.write_all(&(len as u32).to_le_bytes())?;
        Ok((out, r))
    })
}

/// Opens the gate to every thread when dropped.
struct OpenAtEnd<'a>(Option<&'a Arc<Gate>>, usize);

impl Drop for OpenAtEnd<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            g.set(self.1);
        }
    }
}

struct Chunker {
    tx: Option<SyncSender<Job>>,
    buf: Vec<u8>,
    seq: u64,
    crc: crc32fast::Hasher,
    len: u64,
}

impl Chunker {
    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.crc.update(&chunk);
        self.len += chunk.len() as u64;
        let tx = self.tx.as_ref().expect("open while producing");
        tx.send((self.seq, chunk)).map_err(|_| io::Error::other("gzip compressor stopped"))?;
        self.seq += 1;
        Ok(())
    }
}

impl Write for Chunker {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            let room = CHUNK - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == CHUNK {
                self.flush_chunk()?;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn worker(rx: Arc<Mutex<Receiver<Job>>>, tx: SyncSender<Done>, gate: Option<(Arc<Gate>, usize)>) {
    loop {
        if let Some((g, k)) = &gate {
            g.wait_turn(*k);
        }
        let job = rx.lock().expect("job queue lock").recv();
        let Ok((seq, chunk)) = job else { return };
        #[cfg(test)]
        if let Some((g, _)) = &gate {
            use std::sync::atomic::Ordering::SeqCst;
            let now = g.busy.0.fetch_add(1, SeqCst) + 1;
            g.busy.1.fetch_max(now, SeqCst);
        }
        let done = deflate_chunk(&chunk);
        #[cfg(test)]
        if let Some((g, _)) = &gate {
            g.busy.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        if tx.send((seq, done)).is_err() {
            return;
        }
    }
}

/// Raw deflate of one chunk, ending byte-aligned and not final. The chunk
/// is looked at in 16 KiB pieces: runs of pieces that can compress are
/// deflated together (ending in a sync flush), pieces that cannot are
/// stored.
fn deflate_chunk(input: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 100 + 64);
    let mut run_start = 0;
    let mut at = 0;
    while at < input.len() {
        let end = (at + PIECE).min(input.len());
        if incompressible(&input[at..end]) {
            if run_start < at {
                deflate_into(&input[run_start..at], &mut out)?;
            }
            stored_into(&input[at..end], &mut out);
            run_start = end;
        }
        at = end;
    }
    if run_start < input.len() || input.is_empty() {
        deflate_into(&input[run_start..], &mut out)?;
    }
    Ok(out)
}

fn deflate_into(input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mut c = Compress::new(Compression::new(LEVEL), false);
    out.reserve(input.len() + input.len() / 100 + 64);
    loop {
        let consumed = c.total_in() as usize;
        c.compress_vec(&input[consumed..], out, FlushCompress::Sync)
            .map_err(|e| io::Error::other(format!("deflate: {e}")))?;
        if c.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(());
        }
        out.reserve(64 * 1024);
    }
}

/// The unit the stored-or-deflated choice is made on.
const PIECE: usize = 16 * 1024;

/// Whether a piece's byte histogram is so close to uniform that an order-0
/// coder could save at most about 2%: Pearson's chi-square against the
/// uniform distribution below 512 (random data scores about 255 ± 23; text
/// and code score in the tens of thousands and more). A short last piece
/// is always deflated. Integer arithmetic only, so every machine agrees.
fn incompressible(input: &[u8]) -> bool {
    if input.len() < PIECE {
        return false;
    }
    let n = input.len() as i128;
    // Four tables, so consecutive equal bytes do not wait on one counter.
    let mut t = [[0u32; 256]; 4];
    let mut quads = input.chunks_exact(4);
    for q in &mut quads {
        t[0][q[0] as usize] += 1;
        t[1][q[1] as usize] += 1;
        t[2][q[2] as usize] += 1;
        t[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        t[0][b as usize] += 1;
    }
    let hist: [u32; 256] = std::array::from_fn(|i| t[0][i] + t[1][i] + t[2][i] + t[3][i]);
    // chi2 = sum (256 c - n)^2 / (256 n) < 512
    let sum: i128 = hist.iter().map(|&c| (256 * c as i128 - n).pow(2)).sum();
    sum < 512 * 256 * n
}

/// Non-final stored blocks (at most 65535 bytes each) holding `input`.
fn stored_into(input: &[u8], out: &mut Vec<u8>) {
    for block in input.chunks(65535) {
        let len = block.len() as u16;
        out.push(0); // BFINAL 0, BTYPE 00, padding to the byte
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
}

/// An empty final deflate block.
fn final_block() -> Vec<u8> {
    let mut c = Compress::new(Compression::new(LEVEL), false);
    let mut out = Vec::with_capacity(64);
    c.compress_vec(&[], &mut out, FlushCompress::Finish).expect("finishing an empty stream");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(n: usize) -> Vec<u8> {
        let mut x: u32 = 7;
        (0..n)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 3 == 0 {
                    (x >> 16) as u8
                } else {
                    b'a' + (i % 7) as u8
                }
            })
            .collect()
    }

    /// A gate holding all but one thread back gives the same bytes; the
    /// held threads take chunks once it opens; none is left held when the
    /// producer fails or panics.
    #[test]
    fn a_gate_changes_only_how_many_threads_work() {
        let data = sample(CHUNK * 6 + 5);
        let (plain, _) = compress(Vec::new(), 3, |w| w.write_all(&data)).unwrap();
        let gate = Gate::new(1);
        let peak = || gate.busy.1.load(std::sync::atomic::Ordering::SeqCst);
        let mut held_peak = 0;
        let (gated, _) = compress_gated(Vec::new(), 3, Some(&gate), |w| {
            for (i, piece) in data.chunks(CHUNK / 2).enumerate() {
                if i == 10 {
                    // Five chunks queued: time for every thread the gate lets to take one.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    held_peak = peak();
                    gate.set(3); // someone waits for the blob now
                }
                w.write_all(piece)?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(gated, plain);
        assert_eq!(held_peak, 1, "one thread at work while the gate let one");
        // Held the whole time, the producer failing: the call returns.
        let held = Gate::new(1);
        let err = compress_gated(Vec::new(), 3, Some(&held), |w| {
            w.write_all(&data)?;
            Err::<(), _>(io::Error::other("producer failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "producer failed");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let held = Gate::new(1);
            let _ = compress_gated(Vec::new(), 3, Some(&held), |w| -> io::Result<()> {
                w.write_all(&data)?;
                panic!("producer panicked")
            });
        }));
        assert!(panicked.is_err());
    }

    #[test]
    fn round_trips_and_ignores_thread_count() {
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK * 2 + 17] {
            let data = sample(n);
            let (one, _) = compress(Vec::new(), 1, |w| w.write_all(&data)).unwrap();
            let (three, _) = compress(Vec::new(), 3, |w| {
                for piece in data.chunks(1000) {
                    w.write_all(piece)?;
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(one, three, "same bytes whatever the threads and write sizes (n={n})");
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&one[..]).read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
            assert_eq!(&one[..10], &HEADER);
        }
    }

    #[test]
    fn random_chunks_are_stored_and_still_round_trip() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let random: Vec<u8> = (0..CHUNK * 2 + 5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(random.chunks(PIECE).filter(|p| p.len() == PIECE).all(incompressible));
        assert!(!incompressible(&sample(PIECE)), "text-like data is compressed");
        let mut data = random.clone();
        data.extend(sample(CHUNK));
        let (gz, _) = compress(Vec::new(), 2, |w| w.write_all(&data)).unwrap();
        assert!(gz.len() < data.len(), "the text part still shrinks");
        let (one, _) = compress(Vec::new(), 1, |w| w.write_all(&random[..CHUNK])).unwrap();
        let blocks = CHUNK / PIECE; // each piece is at most one stored block
        assert_eq!(one.len(), 10 + CHUNK + 5 * blocks + final_block().len() + 8, "stored, not deflated");
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn producer_errors_propagate() {
        let r: io::Result<(Vec<u8>, ())> = compress(Vec::new(), 2, |w| {
            w.write_all(&[0u8; 3 * CHUNK])?;
            Err(io::Error::other("boom"))
        });
        assert_eq!(r.unwrap_err().to_string(), "boom");
    }
}
