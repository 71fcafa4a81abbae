//! Child reaping. As pid 1 of the sandbox the agent inherits every orphan and must reap
//! them all (`waitpid(-1)`); outside a sandbox (unit tests) it only reaps the children it
//! registered, so it never steals another component's child.
//!
//! Exit statuses of registered children are delivered through a oneshot channel. A
//! child that exits before it is registered is remembered until it is claimed.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// Most statuses remembered for children nobody claimed (orphans in a sandbox).
const MAX_UNCLAIMED: usize = 4096;

#[derive(Debug, Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: HashMap<i32, Exit>,
}

/// Reaps children and hands their exit statuses to whoever waits for them.
#[derive(Debug)]
pub struct Reaper {
    state: Mutex<State>,
    reap_all: bool,
}

impl Default for Reaper {
    fn default() -> Self {
        Reaper {
            state: Mutex::new(State::default()),
            reap_all: std::process::id() == 1,
        }
    }
}

impl Reaper {
    /// Registers `pid` and returns where its exit status will arrive.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().expect("reaper lock");
        match state.unclaimed.remove(&pid) {
            Some(exit) => {
                let _ = tx.send(exit);
            }
            None => {
                state.waiters.insert(pid, tx);
            }
        }
        drop(state);
        // It may have exited between spawn and registration without us seeing SIGCHLD yet.
        self.reap();
        rx
    }

    /// Reaps whatever has exited and delivers the statuses.
    pub fn reap(&self) {
        let mut state = self.state.lock().expect("reaper lock");
        if self.reap_all {
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(status) => deliver(&mut state, status),
                }
            }
        } else {
            let pids: Vec<i32> = state.waiters.keys().copied().collect();
            for pid in pids {
                if let Ok(status) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    deliver(&mut state, status);
                }
            }
        }
    }

    /// Reaps on every SIGCHLD until the runtime shuts down.
    pub fn spawn(self: &Arc<Self>) -> io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        let me = self.clone();
        tokio::spawn(async move {
            me.reap();
            while sigchld.recv().await.is_some() {
                me.reap();
            }
        });
        Ok(())
    }
}

fn deliver(state: &mut State, status: WaitStatus) {
    let (pid, exit) = match status {
        WaitStatus::Exited(pid, code) => (pid.as_raw(), Exit::Code(code)),
        WaitStatus::Signaled(pid, sig, _) => (pid.as_raw(), Exit::Signal(sig as i32)),
        _ => return,
    };
    match state.waiters.remove(&pid) {
        Some(tx) => {
            let _ = tx.send(exit);
        }
        None => {
            if state.unclaimed.len() >= MAX_UNCLAIMED {
                state.unclaimed.clear();
            }
            state.unclaimed.insert(pid, exit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // the reaper under test waits for them
    async fn statuses_reach_their_waiters() {
        let reaper = Arc::new(Reaper::default());
        reaper.spawn().unwrap();
        let ok = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let killed = std::process::Command::new("/bin/sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        let a = reaper.watch(ok.id() as i32);
        let b = reaper.watch(killed.id() as i32);
        assert_eq!(a.await.unwrap(), Exit::Code(3));
        assert_eq!(b.await.unwrap(), Exit::Signal(9));
    }
}
