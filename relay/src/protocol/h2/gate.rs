//! A poll of the tunnel's WebSocket that found nothing is not repeated until something
//! has woken it.
//!
//! HTTP/2 polls its byte stream for reading every time its connection task runs, and
//! that task runs several times per request for reasons that have nothing to do with
//! the socket (a stream handed it a frame to send, a body was read, a window opened).
//! Each such poll went all the way into the WebSocket library, which zero-fills its
//! read buffer (4 KiB) before every read, and then into the socket, only to find
//! nothing: 4.6 polls per request on the relay and 7.5 on the agent at one request at a
//! time, 14–17 % of each side's instructions (BENCHMARKS.md, tunnel comparison run 14).
//!
//! A [`ReadGate`] lends the WebSocket a waker of its own, which records that it was
//! woken before passing the wake-up on to the task. Until that happens, a read that
//! last ended `Pending` ends `Pending` again at once: this relies only on the contract
//! of `poll_next`, that `Pending` means the waker it was given will be woken when
//! polling again could make progress.
//!
//! [`Gated`] does the same for any future. The agent drives its HTTP/2 connection from
//! the tunnel's task, whose `select!` also waits for the watchdogs' timers, control
//! messages and cancellation: without a gate each of those is polled again on every
//! one of the connection's wake-ups, several per request, though none of them changed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Remembers whether the WebSocket's last read ended `Pending` and whether it has been
/// woken since.
#[derive(Debug)]
pub(crate) struct ReadGate {
    shared: Arc<Shared>,
    /// The waker lent to the WebSocket: always the same one, so the socket and the
    /// library see the same waker on every poll and keep their registration.
    waker: Waker,
    /// The last read ended `Pending`.
    pending: bool,
}

#[derive(Debug, Default)]
struct Shared {
    /// Woken since the last read started.
    woken: AtomicBool,
    /// The task reading now (the connection's, or the tunnel's while no connection is
    /// up: whoever polled last).
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for ReadGate {
    fn default() -> Self {
        let shared = Arc::new(Shared::default());
        ReadGate {
            waker: Waker::from(shared.clone()),
            shared,
            pending: false,
        }
    }
}

impl ReadGate {
    /// Polls `read` with the gate's waker, or ends `Pending` at once when the last read
    /// did and nothing has woken it since. Either way the task of `cx` is the one woken.
    pub(crate) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        read: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.shared.task.register(cx.waker());
        // Cleared before the read, so a wake-up during it is not lost: it leaves the
        // flag set for the next poll.
        let woken = self.shared.woken.swap(false, Ordering::AcqRel);
        if self.pending && !woken {
            return Poll::Pending;
        }
        let polled = read(&mut Context::from_waker(&self.waker));
        self.pending = polled.is_pending();
        polled
    }
}

/// A future polled through a [`ReadGate`]: after it ends `Pending`, it is polled again
/// only once it has woken its task.
#[derive(Debug)]
pub(crate) struct Gated<F> {
    gate: ReadGate,
    future: F,
}

impl<F: Future + Unpin> Gated<F> {
    pub(crate) fn new(future: F) -> Self {
        Gated {
            gate: ReadGate::default(),
            future,
        }
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.gate.poll(cx, |cx| Pin::new(&mut this.future).poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A read that counts its polls, ends `Pending` (keeping the waker) until `ready`.
    #[derive(Default)]
    struct Source {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Source {
        fn read(&self, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.swap(false, Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn arrive(&self) {
            self.ready.store(true, Ordering::SeqCst);
            if let Some(waker) = self.waker.lock().unwrap().take() {
                waker.wake();
            }
        }
    }

    /// Counts the wake-ups of the reading task.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A source, the task reading it (its waker) and a gate between them.
    fn reader() -> (Source, Arc<Task>, Waker, ReadGate) {
        let task = Arc::new(Task::default());
        let waker = Waker::from(task.clone());
        (Source::default(), task, waker, ReadGate::default())
    }

    #[test]
    fn a_read_that_found_nothing_is_not_repeated_until_woken() {
        let (source, task, waker, mut gate) = reader();
        let mut cx = Context::from_waker(&waker);

        assert!(gate.poll(&mut cx, |cx| source.read(cx)).is_pending());
        assert!(gate.poll(&mut cx, |cx| source.read(cx)).is_pending());
        assert!(gate.poll(&mut cx, |cx| source.read(cx)).is_pending());
        assert_eq!(
            source.polls.load(Ordering::SeqCst),
            1,
            "polled again unwoken"
        );

        source.arrive();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was not woken");
        assert!(gate.poll(&mut cx, |cx| source.read(cx)).is_ready());
        assert_eq!(source.polls.load(Ordering::SeqCst), 2);
        // Ready does not close the gate: the next read goes through.
        assert!(gate.poll(&mut cx, |cx| source.read(cx)).is_pending());
        assert_eq!(source.polls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_wake_up_during_the_read_opens_the_gate_for_the_next_poll() {
        let (source, _task, waker, mut gate) = reader();
        let mut cx = Context::from_waker(&waker);

        // The source is woken while the read is under way (before it returns Pending).
        let polled = gate.poll(&mut cx, |cx| {
            cx.waker().wake_by_ref();
            source.read(cx)
        });
        assert!(polled.is_pending());
        assert!(gate.poll(&mut cx, |cx| source.read(cx)).is_pending());
        assert_eq!(
            source.polls.load(Ordering::SeqCst),
            2,
            "the wake-up was lost"
        );
    }

    #[test]
    fn a_gated_future_is_polled_again_only_once_it_woke_its_task() {
        let (source, task, waker, _) = reader();
        let mut cx = Context::from_waker(&waker);
        let mut gated = Gated::new(std::future::poll_fn(|cx| source.read(cx)));

        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(
            source.polls.load(Ordering::SeqCst),
            1,
            "polled again unwoken"
        );

        source.arrive();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was not woken");
        assert_eq!(Pin::new(&mut gated).poll(&mut cx), Poll::Ready(()));
        assert_eq!(source.polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_task_that_polled_last_is_the_one_woken() {
        let source = Source::default();
        let first = Arc::new(Task::default());
        let second = Arc::new(Task::default());
        let mut gate = ReadGate::default();

        let waker = Waker::from(first.clone());
        assert!(
            gate.poll(&mut Context::from_waker(&waker), |cx| source.read(cx))
                .is_pending()
        );
        let waker = Waker::from(second.clone());
        assert!(
            gate.poll(&mut Context::from_waker(&waker), |cx| source.read(cx))
                .is_pending()
        );
        source.arrive();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
