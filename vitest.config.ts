import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // The default suite: test/unit (in-process, no HSM token, no child process) and
    // test/integration (real tokens, SQLite files, etcd members, daemons over sockets).
    // test/soak (RSS, timing, long runs) needs an idle machine: vitest.soak.config.ts,
    // run by ./scripts/soak and ./scripts/timing.
    include: ['test/unit/**/*.test.ts', 'test/integration/**/*.test.ts'],
    globalSetup: ['test/global-setup.ts'],
    // Each file in its own process: SoftHSM reads SOFTHSM2_CONF once per
    // C_Initialize, and native modules must not leak state between files.
    pool: 'forks',
    isolate: true,
    fileParallelism: true,
    // Three files at a time on two cores: many wait on daemons, etcd elections and child
    // processes. Measured side by side: 246 s with two, 217 s with three.
    maxWorkers: 3,
    testTimeout: 60_000,
    // ./scripts/coverage: lines of the shipped code run by the suite in its own processes
    // (a spawned daemon's lines are not counted, so the figure is a floor).
    coverage: {
      provider: 'v8',
      include: ['vault/**/*.ts', 'protocol/**/*.ts', 'client/**/*.ts', 'hsm-policy/**/*.ts'],
      reporter: ['text-summary', 'json-summary'],
      reportsDirectory: 'coverage',
    },
    hookTimeout: 60_000,
  },
});
