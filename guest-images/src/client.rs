//! A blocking client of the agent, for tests, the lab and benchmarks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::proto::{decode_hex, parse_pairs, ProtoError, Reply, Request, MAX_LINE};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the agent at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent closed the connection")]
    Closed,
    #[error("the agent answered: {0}")]
    Refused(String),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("unexpected reply {0:?}")]
    Unexpected(String),
}

/// Parsed `STATUS` reply.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub pairs: Vec<(String, String)>,
}

impl Status {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }
}

pub struct AgentClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// How long a request of `connect_retry`'s client may wait for its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl AgentClient {
    pub fn connect(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let err = |source| ClientError::Connect {
            addr: format!("{addr:?}"),
            source,
        };
        let sock = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(std::io::ErrorKind::NotFound.into()))?;
        let stream = TcpStream::connect_timeout(&sock, timeout).map_err(err)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(AgentClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Retries `connect` until it succeeds or `deadline` passes (a guest still booting).
    pub fn connect_retry(addr: &str, deadline: Duration) -> Result<Self, ClientError> {
        let start = Instant::now();
        loop {
            // When retrying, short attempts: a SYN lost while the guest moves (failover)
            // is sent anew by the next attempt instead of waiting out TCP's one-second
            // retransmission. A single try gets the whole usual time.
            let attempt = if deadline.is_zero() {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(1)
            };
            match Self::connect(addr, attempt) {
                Ok(c) => {
                    // A request gets 30 s: lab test hosts stall their guests for 5 s now
                    // and then (the guest's clocksource watchdog logs the gap), and a
                    // connected guest that truly stopped answering is no faster to tell.
                    c.writer.set_write_timeout(Some(REQUEST_TIMEOUT))?;
                    c.set_timeout(REQUEST_TIMEOUT)?;
                    return Ok(c);
                }
                Err(e) if start.elapsed() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn set_timeout(&self, timeout: Duration) -> Result<(), ClientError> {
        self.writer.set_read_timeout(Some(timeout))?;
        Ok(())
    }

    /// Sends a raw line and returns the raw reply line (for tests of malformed input).
    pub fn raw(&mut self, line: &str) -> Result<String, ClientError> {
        // One write, so one TCP segment (no delay is set), not the line and its newline
        // apart.
        let mut message = Vec::with_capacity(line.len() + 1);
        message.extend_from_slice(line.as_bytes());
        message.push(b'\n');
        self.writer.write_all(&message)?;
        let mut reply = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 16)
            .read_line(&mut reply)?;
        if n == 0 || !reply.ends_with('\n') {
            return Err(ClientError::Closed);
        }
        reply.pop();
        Ok(reply)
    }

    pub fn call(&mut self, req: &Request) -> Result<String, ClientError> {
        match Reply::parse(&self.raw(&req.encode())?)? {
            Reply::Ok(s) => Ok(s),
            Reply::Err(e) => Err(ClientError::Refused(e)),
        }
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Ping).map(|_| ())
    }

    pub fn status(&mut self) -> Result<Status, ClientError> {
        let text = self.call(&Request::Status)?;
        Ok(Status {
            pairs: parse_pairs(&text)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// An acknowledged write: returns only once the agent has `fdatasync`ed it.
    pub fn write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let reply = self.call(&Request::Write {
            disk: disk.into(),
            offset,
            data: data.to_vec(),
        })?;
        if reply != data.len().to_string() {
            return Err(ClientError::Unexpected(reply));
        }
        Ok(())
    }

    pub fn read(&mut self, disk: &str, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        let reply = self.call(&Request::Read {
            disk: disk.into(),
            offset,
            len,
        })?;
        let data = decode_hex(&reply)?;
        if data.len() != len as usize {
            return Err(ClientError::Unexpected(format!("{} bytes", data.len())));
        }
        Ok(data)
    }

    pub fn mem_start(&mut self, mib: u32, pages_per_sec: u64) -> Result<(), ClientError> {
        self.call(&Request::MemStart { mib, pages_per_sec })
            .map(|_| ())
    }

    /// Returns (pages checked, pages wrong).
    pub fn mem_verify(&mut self) -> Result<(u64, u64), ClientError> {
        let reply = self.call(&Request::MemVerify)?;
        let pairs = parse_pairs(&reply);
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .and_then(|(_, v)| v.parse().ok())
        };
        match (get("pages"), get("errors")) {
            (Some(p), Some(e)) => Ok((p, e)),
            _ => Err(ClientError::Unexpected(reply)),
        }
    }

    pub fn shutdown(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Shutdown).map(|_| ())
    }
}
