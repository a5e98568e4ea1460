//! Telling systemd how the service is doing (sd_notify(3), the `Type=notify` protocol of
//! systemd.service(5)): `READY=1` once every listener is bound and the spool is open,
//! `RELOADING=1` / `READY=1` around a configuration reload, `STOPPING=1` at shutdown,
//! and a free-form `STATUS=` line for `systemctl status`.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by systemd) every function
//! does nothing. A failure to send is logged and otherwise ignored: the relay works
//! whether or not anyone listens.
//!
//! Trust: the socket is systemd's; what we send is our own fixed words, and a status
//! text has its line breaks replaced, so it cannot add an assignment of its own.

use sd_notify::NotifyState;

/// Every listener is bound and the spool is open: systemd considers the start done
/// (and, after [`reloading`], the reload).
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("accepting mail")]);
}

/// A reload has begun. `MONOTONIC_USEC` comes with it, as `Type=notify-reload` requires
/// (systemd.service(5)); [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the configuration"),
        ]),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the monotonic clock for systemd");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// A line for `systemctl status`.
pub fn status(text: &str) {
    let line = one_line(text);
    send(&[NotifyState::Status(&line)]);
}

/// `text` with every line break (which would start another assignment) made a space.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn notify_status_stays_one_assignment() {
        assert_eq!(super::one_line("a\nREADY=1\r\nb"), "a READY=1  b");
    }
}
