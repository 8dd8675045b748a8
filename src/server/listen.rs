//! Serving on a socket: TCP_NODELAY on every connection (streamed tokens
//! are small writes that Nagle would hold back), and graceful shutdown on
//! SIGINT or SIGTERM — stop accepting, let in-flight requests finish, and
//! after a grace period end the ones left (streams with an error event and
//! `[DONE]`, whole answers with 503) so a stuck client cannot hold the
//! process forever and no client sees a cut connection.

use std::future::{pending, IntoFuture};
use std::io;
use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// After the grace period, how long the requests just told to stop get to
/// send their last bytes before the process exits anyway.
const FLUSH: Duration = Duration::from_secs(2);

/// Serves `app` until a shutdown signal, then waits up to `grace` for
/// in-flight requests; then calls `stop_in_flight` (which ends them, see
/// [`AppState::stop_in_flight`](super::AppState::stop_in_flight)) and
/// gives them [`FLUSH`] to say so.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    grace: Duration,
    stop_in_flight: impl FnOnce(),
) -> io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (tx, mut rx) = watch::channel(false);
    let signal = async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .into_future();
    tokio::pin!(server);
    let deadline = async move {
        if rx.wait_for(|&stopping| stopping).await.is_err() {
            pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = &mut server => return result,
        () = deadline => {}
    }
    eprintln!(
        "in-flight requests did not finish within {} s; ending them",
        grace.as_secs()
    );
    stop_in_flight();
    match tokio::time::timeout(FLUSH, &mut server).await {
        Ok(result) => result,
        Err(_) => {
            eprintln!("connections still open after ending their requests; exiting");
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
