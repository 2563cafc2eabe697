//! How many threads the kernels may use.
//!
//! Work is shared out only by outputs (row blocks of a product, images of
//! a batch, channels), never inside a reduction, so 1, 2 or 16 threads give
//! the same bits (`docs/arithmetic.md`, "Threads"). The count is fixed once
//! per process: [`configure`] (the CLI's `--threads`), else the environment
//! variable `MIXNN_THREADS`, else every core the process may use.
//! [`with_count`] runs a closure on a pool of its own (tests, benches).

use std::sync::OnceLock;

use crate::error::{ModelError, Result};

static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
static WANTED: OnceLock<usize> = OnceLock::new();

/// Fixes the process's thread count (at least 1). Fails if the kernels
/// already run with another count.
pub fn configure(n: usize) -> Result<()> {
    let n = n.max(1);
    let set = *WANTED.get_or_init(|| n);
    if set != n {
        return Err(ModelError::Kernels(format!(
            "the kernels already use {set} threads; {n} asked for too late"
        )));
    }
    Ok(())
}

fn from_env() -> usize {
    match std::env::var("MIXNN_THREADS") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse::<usize>().unwrap_or(1).max(1),
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// Checks `MIXNN_THREADS` (a positive integer, when set): binaries call
/// this to report a bad value rather than run on one thread.
pub fn check_env() -> Result<()> {
    match std::env::var("MIXNN_THREADS") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(()),
            _ => Err(ModelError::Kernels(format!(
                "MIXNN_THREADS={v:?}: expected a positive number of threads"
            ))),
        },
        _ => Ok(()),
    }
}

/// The process's thread count ([`configure`], `MIXNN_THREADS`, or the
/// cores available).
pub fn configured() -> usize {
    *WANTED.get_or_init(from_env)
}

/// Threads the kernels use here: inside [`with_count`] (or any rayon
/// pool) that pool's size, else [`configured`].
pub fn count() -> usize {
    if rayon::current_thread_index().is_some() {
        rayon::current_num_threads()
    } else {
        configured()
    }
}

/// Runs `f` where the kernels' parallel loops find their threads: the
/// current pool, if `f` is already called from one, else the process's.
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(configured())
            .thread_name(|i| format!("mixnn-kernel-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(pool) => pool.install(f),
        // No threads could be started: the caller computes alone.
        None => f(),
    }
}

/// Work below this many values stays on the calling thread: waking the
/// pool costs more than it saves.
pub(crate) const PARALLEL_VALUES: usize = 1 << 16;

/// Runs `f(index, chunk)` over `data` in chunks of `len` items (the last
/// one shorter), on the kernel threads when the call touches at least
/// [`PARALLEL_VALUES`] values (`work`), else on the calling thread. Only
/// for work whose chunks compute their outputs alone: how the chunks are
/// shared out then changes no bit.
pub(crate) fn for_chunks<T: Send>(
    data: &mut [T],
    len: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    use rayon::prelude::*;
    if len == 0 {
        return;
    }
    if work >= PARALLEL_VALUES && data.len() > len && count() > 1 {
        install(|| {
            data.par_chunks_mut(len)
                .enumerate()
                .for_each(|(i, c)| f(i, c))
        });
    } else {
        data.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// A buffer kept on each thread from one call of a kernel to the next.
pub(crate) type Scratch = std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>;

/// This thread's buffer of `key`, `len` values long. Its values are
/// whatever the last user left (zeros where it grew): only for a caller
/// that rewrites every value before reading any. Give it back with
/// [`keep_scratch`] (a buffer not given back is simply allocated again).
pub(crate) fn take_scratch(key: &'static Scratch, len: usize) -> Vec<f32> {
    let mut v = key.with(|s| std::mem::take(&mut *s.borrow_mut()));
    v.resize(len, 0.0);
    v
}

/// Keeps `v` as this thread's buffer of `key`.
pub(crate) fn keep_scratch(key: &'static Scratch, v: Vec<f32>) {
    key.with(|s| *s.borrow_mut() = v);
}

/// Runs `f` with the kernels on a pool of `n` threads of its own.
pub fn with_count<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build()
        .map_err(|e| ModelError::Kernels(format!("cannot start {n} kernel threads: {e}")))?;
    Ok(pool.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_count_sets_the_count_inside_only() {
        assert_eq!(with_count(3, count).unwrap(), 3);
        assert_eq!(with_count(1, count).unwrap(), 1);
        assert!(count() >= 1);
    }
}
