//! Asynchronous data I/O on an image (write, write zeroes, read, flush). Each request gets a
//! librbd completion whose callback, run on a librbd thread, sends the result through a oneshot
//! channel; the request's buffer and a handle on the image live in the callback's context, so a
//! cancelled future never frees memory librbd still uses.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::api::{api, Api, CompletionT, ImageT};
use crate::image::{Image, ImageInner};
use crate::RbdError;

/// What an aio callback hands back.
type AioResult = (isize, Option<Vec<u8>>);

/// Owned by the completion until its callback runs.
struct AioCtx {
    tx: Option<oneshot::Sender<AioResult>>,
    /// Write payload, kept alive until librbd is done with it.
    _write: Option<Bytes>,
    /// Read buffer, handed back with the result.
    read: Option<Vec<u8>>,
    _image: Arc<ImageInner>,
}

unsafe extern "C" fn aio_done(c: CompletionT, arg: *mut c_void) {
    // SAFETY: arg is the Box<AioCtx> leaked in `submit`, reclaimed exactly once here; the API
    // was loaded before any completion could exist.
    unsafe {
        let mut ctx = Box::from_raw(arg as *mut AioCtx);
        let ret = match api() {
            Ok(api) => {
                let r = (api.rbd_aio_get_return_value)(c);
                (api.rbd_aio_release)(c);
                r
            }
            Err(_) => -(libc::EIO as isize),
        };
        if let Some(tx) = ctx.tx.take() {
            let _ = tx.send((ret, ctx.read.take()));
        }
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
    ) -> Result<oneshot::Receiver<AioResult>, RbdError> {
        let api = api()?;
        let (tx, rx) = oneshot::channel();
        let ctx =
            Box::into_raw(Box::new(AioCtx { tx: Some(tx), _write: write, read, _image: self.inner.clone() }));
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

    async fn wait(op: String, rx: oneshot::Receiver<AioResult>) -> Result<AioResult, RbdError> {
        let (ret, buf) = rx.await.map_err(|_| RbdError::Invalid(format!("{op}: completion lost")))?;
        if ret < 0 {
            return Err(RbdError::Call { op, errno: (-ret) as i32 });
        }
        Ok((ret, buf))
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), RbdError> {
        let op = format!("write {} bytes at {offset}", data.len());
        let rx = self.submit(&op, Some(data), None, |api, image, c, ctx| {
            let buf = ctx._write.as_ref().expect("write buffer");
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
