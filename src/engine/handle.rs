//! An engine on its own thread behind a cloneable handle: the server's way
//! in. Compute never runs on the async runtime; requests cross a channel to
//! the engine thread and events come back on a per-request channel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{Engine, EngineLimits, Event, KvBudget, Request, Sink};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::{Error, Result};

enum Command {
    Submit(Request, Box<dyn super::Sink>),
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    /// Requests submitted and not yet finished, for the queue limit.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    kv_budget: KvBudget,
}

/// Decrements the in-flight count when a request's sink is dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request's events, sent to its caller's channel. A dropped receiver
/// reads as closed, so a request still in the queue or part-way through
/// its prompt is dropped before it produces anything.
struct ChannelSink {
    tx: UnboundedSender<Event>,
    _in_flight: InFlight,
}

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.tx.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl EngineHandle {
    /// Starts the engine thread. At most `max_batch` sequences run together
    /// and `max_queue` more wait; beyond that `submit` refuses.
    pub fn spawn(
        pipeline: Arc<Pipeline>,
        limits: EngineLimits,
        max_queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Command>();
        let mut engine = Engine::new(pipeline.clone(), limits, metrics.clone());
        let kv_budget = engine.kv_budget();
        std::thread::Builder::new()
            .name("taper-engine".into())
            .spawn(move || loop {
                // Block when idle; otherwise take what arrived and step.
                if engine.is_idle() {
                    match rx.recv() {
                        Ok(Command::Submit(r, s)) => {
                            engine.submit(r, s);
                        }
                        Err(_) => return,
                    }
                }
                while let Ok(Command::Submit(r, s)) = rx.try_recv() {
                    engine.submit(r, s);
                }
                // A panic inside a forward pass (a bug, not bad input) fails
                // the sequences in that batch; the engine keeps serving.
                let stepped =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
                if stepped.is_err() {
                    engine
                        .abort_running("internal error while generating; the request was dropped");
                }
            })
            .map_err(|e| Error::Device(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            tx,
            pipeline,
            metrics,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: limits.max_batch + max_queue,
            kv_budget,
        })
    }

    /// The engine's KV budget in blocks.
    pub fn kv_budget(&self) -> KvBudget {
        self.kv_budget
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Queues a request. Dropping the receiver cancels it. Fails with
    /// [`Error::Overloaded`] when the queue is full.
    pub fn submit(&self, request: Request) -> Result<UnboundedReceiver<Event>> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self.in_flight.clone());
        if now >= self.max_in_flight {
            return Err(Error::Overloaded(format!(
                "{now} requests are running or queued (limit {}); retry later",
                self.max_in_flight
            )));
        }
        let (etx, erx) = unbounded_channel();
        let sink = ChannelSink {
            tx: etx,
            _in_flight: guard,
        };
        self.tx
            .send(Command::Submit(request, Box::new(sink)))
            .map_err(|_| Error::Overloaded("the engine has stopped".into()))?;
        Ok(erx)
    }
}
