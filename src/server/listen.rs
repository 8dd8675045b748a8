//! Serving on a socket: TCP_NODELAY on every connection (streamed tokens
//! are small writes that Nagle would hold back), and graceful shutdown on
//! SIGINT or SIGTERM — stop accepting, let in-flight requests finish, and
//! stop waiting after a grace period so a stuck client cannot hold the
//! process forever.

use std::future::pending;
use std::io;
use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves `app` until a shutdown signal, then waits up to `grace` for
/// in-flight requests.
pub async fn serve(listener: TcpListener, app: Router, grace: Duration) -> io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (tx, mut rx) = watch::channel(false);
    let signal = async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    let deadline = async move {
        if rx.wait_for(|&stopping| stopping).await.is_err() {
            pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            eprintln!(
                "in-flight requests did not finish within {} s; exiting",
                grace.as_secs()
            );
            Ok(())
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    eprintln!("shutting down: no new connections; finishing in-flight requests");
}
