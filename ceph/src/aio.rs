//! Asynchronous data I/O on an image (write, write zeroes, read, flush). Each request gets a
//! librbd completion whose callback, run on a librbd thread, sends the result through a oneshot
//! channel; the request's buffer and a reference on the image live in the callback's context,
//! so a cancelled future never frees memory librbd still uses. The callback never drops that
//! image reference itself: closing an image from inside its own completion callback deadlocks
//! librbd (rbd_close waits for the callback to return), so the reference travels back with the
//! result, or to a reaper thread when nobody awaits the result any more.

use std::ffi::{c_char, c_int, c_void};
use std::sync::{mpsc, Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::api::{api, Api, CompletionT, ImageT};
use crate::image::{Image, ImageInner};
use crate::RbdError;

/// What an aio callback hands back: librbd's return value, the read buffer, and the request's
/// reference on the image, so that whoever receives the result (or drops the receiver with an
/// unreceived result: tokio's oneshot drops it in `Receiver::drop`) drops that reference too.
struct AioDone {
    ret: isize,
    read: Option<Vec<u8>>,
    _image: Arc<ImageInner>,
}

/// Owned by the completion until its callback runs.
struct AioCtx {
    tx: oneshot::Sender<AioDone>,
    /// Write payload, kept alive until librbd is done with it.
    write: Option<Bytes>,
    /// Read buffer, handed back with the result.
    read: Option<Vec<u8>>,
    image: Arc<ImageInner>,
}

unsafe extern "C" fn aio_done(c: CompletionT, arg: *mut c_void) {
    // Declared first so it is dropped last: everything the callback drops sees the flag.
    #[cfg(test)]
    let _scope = CallbackScope::enter();
    // SAFETY: arg is the Box<AioCtx> leaked in `submit`, reclaimed exactly once here; the API
    // was loaded before any completion could exist.
    unsafe {
        let AioCtx { tx, write, read, image } = *Box::from_raw(arg as *mut AioCtx);
        #[cfg(test)]
        let probe = image.probe.clone();
        #[cfg(test)]
        probe.before_result.pass();
        let ret = match api() {
            Ok(api) => {
                let r = (api.rbd_aio_get_return_value)(c);
                (api.rbd_aio_release)(c);
                r
            }
            Err(_) => -(libc::EIO as isize),
        };
        // librbd is done with the payload; dropping it here only frees memory.
        drop(write);
        if let Err(AioDone { _image: image, .. }) = tx.send(AioDone { ret, read, _image: image }) {
            // The future was cancelled: nobody will drop the reference for us.
            close_later(image);
        }
        #[cfg(test)]
        probe.after_result.pass();
    }
}

/// Drop an image reference on the reaper thread instead of the current (librbd callback)
/// thread, in case it is the last one and dropping it closes the image.
fn close_later(image: Arc<ImageInner>) {
    static REAPER: OnceLock<Option<mpsc::Sender<Arc<ImageInner>>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Arc<ImageInner>>();
        let spawned = std::thread::Builder::new().name("rbd-reaper".into()).spawn(move || {
            for image in rx {
                drop(image);
            }
        });
        spawned.ok().map(|_| tx)
    });
    let stranded = match reaper {
        Some(tx) => tx.send(image).err().map(|mpsc::SendError(image)| image),
        None => Some(image),
    };
    if let Some(image) = stranded {
        // No reaper (the thread could not be started; it never exits): leaking one open image
        // until the process exits is better than a deadlocked librbd thread.
        std::mem::forget(image);
    }
}

impl Image {
    /// Submit an aio request: `start` gets the completion and the request's context (whose
    /// buffers librbd may use until the callback). Synchronous, so no raw pointer lives across
    /// an await.
    fn submit(
        &self,
        op: &str,
        write: Option<Bytes>,
        read: Option<Vec<u8>>,
        start: impl FnOnce(&Api, ImageT, CompletionT, &mut AioCtx) -> c_int,
    ) -> Result<oneshot::Receiver<AioDone>, RbdError> {
        let api = api()?;
        let (tx, rx) = oneshot::channel();
        let ctx = Box::into_raw(Box::new(AioCtx { tx, write, read, image: self.inner.clone() }));
        let mut c: CompletionT = std::ptr::null_mut();
        // SAFETY: ctx stays valid until aio_done reclaims it.
        let r = unsafe { (api.rbd_aio_create_completion)(ctx as *mut c_void, aio_done, &mut c) };
        if r < 0 {
            // SAFETY: the completion was not created, so the callback will never run.
            drop(unsafe { Box::from_raw(ctx) });
            return Err(RbdError::Call { op: op.to_string(), errno: -r });
        }
        // SAFETY: ctx is exclusively ours until the request is submitted.
        let r = start(api, self.ptr(), c, unsafe { &mut *ctx });
        if r < 0 {
            // SAFETY: submission failed, so the callback will not run: release both here.
            unsafe {
                (api.rbd_aio_release)(c);
                drop(Box::from_raw(ctx));
            }
            return Err(RbdError::Call { op: op.to_string(), errno: -r });
        }
        Ok(rx)
    }

    /// The request's result (bytes transferred) and read buffer. The image reference that
    /// came back with them is dropped here, in the awaiting task: if it is the last one, the
    /// image is closed here rather than on librbd's callback thread.
    async fn wait(op: String, rx: oneshot::Receiver<AioDone>) -> Result<(isize, Option<Vec<u8>>), RbdError> {
        let done = rx.await.map_err(|_| RbdError::Invalid(format!("{op}: completion lost")))?;
        if done.ret < 0 {
            return Err(RbdError::Call { op, errno: (-done.ret) as i32 });
        }
        Ok((done.ret, done.read))
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), RbdError> {
        let op = format!("write {} bytes at {offset}", data.len());
        let rx = self.submit(&op, Some(data), None, |api, image, c, ctx| {
            let buf = ctx.write.as_ref().expect("write buffer");
            // SAFETY: the buffer lives in the completion's context until the callback.
            unsafe { (api.rbd_aio_write2)(image, offset, buf.len(), buf.as_ptr() as *const c_char, c, 0) }
        })?;
        Self::wait(op, rx).await.map(|_| ())
    }

    /// Make the range read as zeros (deallocating whole objects where possible).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), RbdError> {
        let n = usize::try_from(len).map_err(|_| RbdError::Invalid("zero extent too large".into()))?;
        let op = format!("zero {len} bytes at {offset}");
        let rx = self.submit(&op, None, None, |api, image, c, _| {
            // SAFETY: valid image and completion.
            unsafe { (api.rbd_aio_write_zeroes)(image, offset, n, c, 0, 0) }
        })?;
        Self::wait(op, rx).await.map(|_| ())
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, RbdError> {
        let op = format!("read {len} bytes at {offset}");
        let rx = self.submit(&op, None, Some(vec![0u8; len]), |api, image, c, ctx| {
            let dst = ctx.read.as_mut().expect("read buffer").as_mut_ptr() as *mut c_char;
            // SAFETY: dst points into the buffer owned by the completion's context.
            unsafe { (api.rbd_aio_read)(image, offset, len, dst, c) }
        })?;
        let (n, buf) = Self::wait(op, rx).await?;
        let buf = buf.ok_or_else(|| RbdError::Invalid("read buffer lost".into()))?;
        if n as usize != len {
            return Err(RbdError::Invalid(format!("short read at {offset}: {n} of {len} bytes")));
        }
        Ok(buf)
    }

    /// Flush every completed write to the OSDs.
    pub async fn flush(&self) -> Result<(), RbdError> {
        let rx = self.submit("flush", None, None, |api, image, c, _| {
            // SAFETY: valid image and completion.
            unsafe { (api.rbd_aio_flush)(image, c) }
        })?;
        Self::wait("flush".into(), rx).await.map(|_| ())
    }
}

#[cfg(test)]
thread_local! {
    /// True while `aio_done` runs on this thread (a librbd callback thread).
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the current thread as inside `aio_done` until dropped.
#[cfg(test)]
struct CallbackScope;

#[cfg(test)]
impl CallbackScope {
    fn enter() -> CallbackScope {
        IN_CALLBACK.with(|f| f.set(true));
        CallbackScope
    }
}

#[cfg(test)]
impl Drop for CallbackScope {
    fn drop(&mut self) {
        IN_CALLBACK.with(|f| f.set(false));
    }
}

/// A point in `aio_done` where a test can park the callback thread.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Gate {
    held: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

#[cfg(test)]
impl Gate {
    pub(crate) fn hold(&self) {
        *self.held.lock().unwrap() = true;
    }

    pub(crate) fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.cv.notify_all();
    }

    fn pass(&self) {
        let held = self.held.lock().unwrap();
        drop(self.cv.wait_while(held, |h| *h).unwrap());
    }
}

/// Per-image test hook: parks the image's completion callbacks before or after they deliver
/// their result (so a test can drop references while a callback is at a known point), and
/// records whether `rbd_close` ran inside a librbd callback.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct CloseProbe {
    pub(crate) before_result: Gate,
    pub(crate) after_result: Gate,
    close: std::sync::Mutex<Close>,
    close_cv: std::sync::Condvar,
}

/// What a test can see of an image's `rbd_close`.
#[cfg(test)]
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    /// None until the close starts; then whether it started on a librbd callback thread.
    pub(crate) on_callback_thread: Option<bool>,
    /// The name of the thread that closed the image.
    pub(crate) thread: Option<String>,
    /// rbd_close returned.
    pub(crate) done: bool,
}

#[cfg(test)]
impl CloseProbe {
    pub(crate) fn closing(&self) {
        let mut close = self.close.lock().unwrap();
        close.on_callback_thread = Some(IN_CALLBACK.with(|f| f.get()));
        close.thread = std::thread::current().name().map(str::to_owned);
    }

    pub(crate) fn closed(&self) {
        self.close.lock().unwrap().done = true;
        self.close_cv.notify_all();
    }

    pub(crate) fn state(&self) -> Close {
        self.close.lock().unwrap().clone()
    }

    /// The state once rbd_close has returned, or after `timeout`.
    pub(crate) fn wait_closed(&self, timeout: std::time::Duration) -> Close {
        let close = self.close.lock().unwrap();
        self.close_cv.wait_timeout_while(close, timeout, |c| !c.done).unwrap().0.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use bytes::Bytes;

    use super::Close;
    use crate::testing::cluster;
    use crate::FEATURE_LAYERING;

    /// Poll once: enough to submit the request (submission is synchronous in the first poll).
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    /// The image was closed, by thread `by`, not on a librbd callback thread.
    fn check_closed(case: &str, close: Close, by: &str) {
        assert_ne!(
            close.on_callback_thread,
            Some(true),
            "{case}: rbd_close was called on librbd's callback thread{}",
            if close.done { "" } else { " and had not returned after 30 s" }
        );
        assert_eq!(
            close,
            Close { on_callback_thread: Some(false), thread: Some(by.to_string()), done: true },
            "{case}: the image was not closed by {by}"
        );
    }

    /// The completion callback can end up holding the last reference to an image: when the
    /// future was cancelled and every `Image` clone dropped, or when the awaiting task got its
    /// result and dropped the last clone before the callback returned. rbd_close must then run
    /// elsewhere than on librbd's callback thread, and must still run. Deterministic: the probe
    /// parks the callback until the test has dropped its references.
    #[tokio::test]
    async fn last_image_reference_is_never_closed_in_the_callback() {
        let Some(rados) = cluster() else { return };
        let io = Arc::new(rados.ioctx("rbd", None).unwrap());
        let name = format!("aio-close-test-{}", std::process::id());
        let _ = io.remove(&name);
        io.create(&name, 4 << 20, FEATURE_LAYERING).unwrap();
        let data = Bytes::from(vec![0x5au8; 64 << 10]);

        // Cancelled: the future (its receiver) and the image are gone while the write is in flight.
        let img = io.open(&name).unwrap();
        let probe = img.inner.probe.clone();
        probe.before_result.hold();
        let mut fut = Box::pin(img.write(0, data.clone()));
        assert!(poll_once(fut.as_mut()).is_pending(), "the write completed while its callback was parked");
        drop(fut);
        drop(img);
        assert_eq!(probe.state(), Close::default(), "closed while a request was in flight");
        probe.before_result.release();
        check_closed("cancelled write", probe.wait_closed(Duration::from_secs(30)), "rbd-reaper");

        // Completed: the task has its result and drops the image before the callback returns.
        // Dropped on a helper thread: rbd_close may wait for the parked callback to return.
        let img = io.open(&name).unwrap();
        let probe = img.inner.probe.clone();
        probe.after_result.hold();
        img.write(0, data.clone()).await.unwrap();
        let dropper = std::thread::Builder::new().name("dropper".into()).spawn(move || drop(img)).unwrap();
        // Release only once the helper's reference is gone: it either returned (someone else
        // holds the last reference) or is itself closing the image.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !dropper.is_finished() && probe.state().on_callback_thread.is_none() {
            assert!(std::time::Instant::now() < deadline, "dropping the image hangs");
            std::thread::sleep(Duration::from_millis(1));
        }
        probe.after_result.release();
        dropper.join().unwrap();
        check_closed("completed write", probe.wait_closed(Duration::from_secs(30)), "dropper");

        let img = io.open(&name).unwrap();
        assert_eq!(img.read(0, data.len()).await.unwrap(), data.to_vec(), "the writes did not land");
        drop(img);
        io.remove(&name).unwrap();
    }
}
