//! A minimal QMP client over a unix socket.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{bail, Result};

/// How long one command may take before the client gives up.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    partial: String,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path` (retrying until it exists, up to `timeout`), reads the greeting
    /// and enters command mode with `qmp_capabilities`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => bail!("cannot connect to QMP socket {}: {e}", path.display()),
            }
        };
        let writer = stream.try_clone()?;
        let mut qmp =
            Qmp { reader: BufReader::new(stream), writer, partial: String::new(), events: Vec::new() };
        let greeting = qmp.read_message(deadline)?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// Runs `cmd` with `args` (`Value::Null` for none); returns its `return` value.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let msg = if args.is_null() {
            json!({ "execute": cmd })
        } else {
            json!({ "execute": cmd, "arguments": args })
        };
        let mut line = serde_json::to_string(&msg)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let reply = self.read_message(deadline)?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                bail!(
                    "QMP {cmd} failed: {}: {}",
                    err["class"].as_str().unwrap_or("?"),
                    err["desc"].as_str().unwrap_or("?")
                );
            }
            if reply.get("event").is_none() {
                bail!("unexpected QMP message: {reply}");
            }
        }
    }

    /// Waits for the event `name`; returns it (events seen earlier count too, and are
    /// consumed).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(i));
            }
            self.read_message(deadline)?;
        }
    }

    /// Events received so far and not yet consumed by [`Qmp::wait_event`].
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Reads one message; stores events in `self.events` and returns every message.
    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out waiting for a QMP message");
            }
            self.reader.get_ref().set_read_timeout(Some(deadline - now))?;
            match self.reader.read_line(&mut self.partial) {
                Ok(0) => bail!("QMP connection closed by QEMU"),
                Ok(_) if self.partial.ends_with('\n') => {
                    let line = std::mem::take(&mut self.partial);
                    if line.trim().is_empty() {
                        continue;
                    }
                    let msg: Value = serde_json::from_str(&line)?;
                    if msg.get("event").is_some() {
                        self.events.push(msg.clone());
                    }
                    return Ok(msg);
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
