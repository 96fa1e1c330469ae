// Opt-in runs for what only an idle machine can judge: RSS and native-memory
// growth, thread races decided by the scheduler, and clock comparisons. In the
// default suite (two cores shared with other test files) the machine's noise
// decides them, not the vault, so they run only from ./scripts/soak (BKV_SOAK=1)
// or ./scripts/timing (BKV_TIMING=1). What they guard still has a deterministic
// test in the suite where one exists (the same HSM calls for right and wrong
// passwords; counters exact under load; a backup streamed in bounded buffers).

/** Memory and scheduling soak tests: ./scripts/soak. */
export const SOAK = process.env.BKV_SOAK === '1';

/** Clock comparisons: ./scripts/timing (BKV_TIMING_CORE is the older name). */
export const TIMING = process.env.BKV_TIMING === '1' || process.env.BKV_TIMING_CORE === '1';
