//! Delay relays and round-trip probes for the emulated WAN of
//! `mixnn bench paper --rtt`.
//!
//! A [`Relay`] accepts TCP connections on one address and forwards each,
//! byte for byte, to another, holding every chunk it reads for a fixed
//! one-way delay before writing it on (in both directions, with a
//! sleeping writer thread per direction, so a 0.25 ms delay is not
//! rounded up to a timer tick). Bandwidth is not limited.
//!
//! The probe measures round trips with one byte echoed by an
//! [`EchoServer`] at the far end of the same path the cascade's bytes take.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Bytes read from a socket at once.
const CHUNK: usize = 64 * 1024;
/// Bound on connecting to the relay's target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A delaying TCP relay; stops accepting when dropped (connections already
/// relayed run until either side closes).
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Relay {
    /// Listens on `listen` and relays every connection to `to`, each byte
    /// `one_way` late in each direction.
    pub fn start(listen: SocketAddr, to: SocketAddr, one_way: Duration) -> anyhow::Result<Relay> {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("relay: binding {listen}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let accept = thread::Builder::new()
            .name(format!("relay {addr}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    match stream {
                        Ok(client) => {
                            thread::spawn(move || {
                                if let Err(e) = relay_one(client, to, one_way) {
                                    tracing::warn!("relay {addr} -> {to}: {e}");
                                }
                            });
                        }
                        Err(e) => tracing::warn!("relay {addr}: accept: {e}"),
                    }
                }
            })?;
        Ok(Relay {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        stop_accepting(&self.stop, self.addr, self.accept.take());
    }
}

/// Stops an accept loop and waits until its listener is closed, so the
/// address is free again when this returns.
fn stop_accepting(stop: &AtomicBool, addr: SocketAddr, accept: Option<thread::JoinHandle<()>>) {
    stop.store(true, Ordering::SeqCst);
    // Wakes the accept loop so it sees the flag.
    if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
        if let Some(t) = accept {
            let _ = t.join();
        }
    }
}

fn relay_one(client: TcpStream, to: SocketAddr, one_way: Duration) -> std::io::Result<()> {
    let upstream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    pipe(client.try_clone()?, upstream.try_clone()?, one_way);
    pipe(upstream, client, one_way);
    Ok(())
}

/// Copies `src` to `dst`, each chunk `delay` after it was read; shuts
/// `dst` down for writing at the end of `src`.
fn pipe(mut src: TcpStream, mut dst: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = src.shutdown(Shutdown::Read);
    });
    thread::spawn(move || {
        for (due, bytes) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if dst.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = dst.shutdown(Shutdown::Write);
    });
}

/// Echoes every byte back on every connection; stops accepting when
/// dropped.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `listen`.
    pub fn start(listen: SocketAddr) -> anyhow::Result<EchoServer> {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("echo: binding {listen}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let accept = thread::Builder::new()
            .name(format!("echo {addr}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut s) = stream else { continue };
                    thread::spawn(move || {
                        let _ = s.set_nodelay(true);
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            })?;
        Ok(EchoServer {
            addr,
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        stop_accepting(&self.stop, self.addr, self.accept.take());
    }
}

/// Median time, in milliseconds, of `count` one-byte round trips to the
/// echo server at `addr` (after one untimed round trip).
pub fn echo_rtt_ms(addr: SocketAddr, count: usize) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("probing {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut byte = [0u8; 1];
    let mut times = Vec::with_capacity(count);
    for i in 0..=count.max(1) {
        let start = Instant::now();
        s.write_all(&[i as u8])?;
        s.read_exact(&mut byte)
            .with_context(|| format!("probing {addr}: no echo"))?;
        if i > 0 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(crate::progress::median(&times))
}

/// `mixnn bench relay` (internal): a relay, and an echo server if asked,
/// in this process until killed.
pub fn run_relay(
    listen: SocketAddr,
    to: SocketAddr,
    one_way: Duration,
    echo: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let relay = Relay::start(listen, to, one_way)?;
    let _echo = echo.map(EchoServer::start).transpose()?;
    crate::progress::say(&format!("relay ready: {}", relay.addr()));
    loop {
        thread::park();
    }
}

/// `mixnn bench probe` (internal): one line `probe ADDR MS` per echo
/// server address.
pub fn run_probe(addrs: &[SocketAddr], count: usize) -> anyhow::Result<()> {
    for addr in addrs {
        let ms = echo_rtt_ms(*addr, count)?;
        crate::progress::say(&format!("probe {addr} {ms:.4}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let echo = EchoServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = echo.addr;
        std::mem::forget(echo);
        addr
    }

    #[test]
    fn relay_forwards_both_ways_after_the_delay() {
        let echo = echo_server();
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo,
            Duration::from_millis(5),
        )
        .unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let start = Instant::now();
        c.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // 5 ms there, 5 ms back.
        assert!(start.elapsed() >= Duration::from_millis(10));
    }

    #[test]
    fn probe_measures_the_relay_delay() {
        let echo = echo_server();
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo,
            Duration::from_millis(1),
        )
        .unwrap();
        let ms = echo_rtt_ms(relay.addr(), 3).unwrap();
        assert!((2.0..50.0).contains(&ms), "{ms} ms");
    }

    #[test]
    fn dropped_relay_stops_accepting() {
        let echo = echo_server();
        let relay = Relay::start("127.0.0.1:0".parse().unwrap(), echo, Duration::ZERO).unwrap();
        let addr = relay.addr();
        drop(relay);
        thread::sleep(Duration::from_millis(50));
        assert!(TcpStream::connect(addr).is_err());
    }
}
