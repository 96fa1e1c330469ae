// The opt-in half of the suite (test/soak): memory, thread races, clock comparisons and long
// runs that only an idle machine judges fairly. ./scripts/soak, ./scripts/timing and
// ./scripts/load run it; the default suite (vitest.config.ts) never does.
import { defineConfig } from 'vitest/config';
import base from './vitest.config.js';

// Spread, not mergeConfig: mergeConfig concatenates arrays, which would add the default
// suite's include globs to this one.
export default defineConfig({
  test: { ...base.test, include: ['test/soak/**/*.test.ts'], maxWorkers: 1, testTimeout: 600_000 },
});
