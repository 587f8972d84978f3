// Clang's thread-safety annotations (-Wthread-safety), after leveldb's
// port/thread_annotations.h: shared state says which mutex guards it, and
// functions say which mutex they need held or must not hold, so that the
// compiler checks what would otherwise be comments. Other compilers see
// nothing. See https://clang.llvm.org/docs/ThreadSafetyAnalysis.html.
#pragma once

#if defined(__clang__)
#define GPUQ_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define GPUQ_THREAD_ANNOTATION(x)
#endif

#ifndef GUARDED_BY
#define GUARDED_BY(x) GPUQ_THREAD_ANNOTATION(guarded_by(x))
#endif

#ifndef PT_GUARDED_BY
#define PT_GUARDED_BY(x) GPUQ_THREAD_ANNOTATION(pt_guarded_by(x))
#endif

#ifndef ACQUIRED_AFTER
#define ACQUIRED_AFTER(...) GPUQ_THREAD_ANNOTATION(acquired_after(__VA_ARGS__))
#endif

#ifndef ACQUIRED_BEFORE
#define ACQUIRED_BEFORE(...) GPUQ_THREAD_ANNOTATION(acquired_before(__VA_ARGS__))
#endif

#ifndef EXCLUSIVE_LOCKS_REQUIRED
#define EXCLUSIVE_LOCKS_REQUIRED(...) \
  GPUQ_THREAD_ANNOTATION(exclusive_locks_required(__VA_ARGS__))
#endif

#ifndef SHARED_LOCKS_REQUIRED
#define SHARED_LOCKS_REQUIRED(...) GPUQ_THREAD_ANNOTATION(shared_locks_required(__VA_ARGS__))
#endif

#ifndef LOCKS_EXCLUDED
#define LOCKS_EXCLUDED(...) GPUQ_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#endif

#ifndef LOCK_RETURNED
#define LOCK_RETURNED(x) GPUQ_THREAD_ANNOTATION(lock_returned(x))
#endif

#ifndef LOCKABLE
#define LOCKABLE GPUQ_THREAD_ANNOTATION(lockable)
#endif

#ifndef SCOPED_LOCKABLE
#define SCOPED_LOCKABLE GPUQ_THREAD_ANNOTATION(scoped_lockable)
#endif

#ifndef EXCLUSIVE_LOCK_FUNCTION
#define EXCLUSIVE_LOCK_FUNCTION(...) \
  GPUQ_THREAD_ANNOTATION(exclusive_lock_function(__VA_ARGS__))
#endif

#ifndef SHARED_LOCK_FUNCTION
#define SHARED_LOCK_FUNCTION(...) GPUQ_THREAD_ANNOTATION(shared_lock_function(__VA_ARGS__))
#endif

#ifndef EXCLUSIVE_TRYLOCK_FUNCTION
#define EXCLUSIVE_TRYLOCK_FUNCTION(...) \
  GPUQ_THREAD_ANNOTATION(exclusive_trylock_function(__VA_ARGS__))
#endif

#ifndef SHARED_TRYLOCK_FUNCTION
#define SHARED_TRYLOCK_FUNCTION(...) \
  GPUQ_THREAD_ANNOTATION(shared_trylock_function(__VA_ARGS__))
#endif

#ifndef UNLOCK_FUNCTION
#define UNLOCK_FUNCTION(...) GPUQ_THREAD_ANNOTATION(unlock_function(__VA_ARGS__))
#endif

#ifndef ASSERT_EXCLUSIVE_LOCK
#define ASSERT_EXCLUSIVE_LOCK(...) GPUQ_THREAD_ANNOTATION(assert_exclusive_lock(__VA_ARGS__))
#endif

#ifndef NO_THREAD_SAFETY_ANALYSIS
#define NO_THREAD_SAFETY_ANALYSIS GPUQ_THREAD_ANNOTATION(no_thread_safety_analysis)
#endif
