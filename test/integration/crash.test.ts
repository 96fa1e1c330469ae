// SIGKILL at seeded moments during concurrent enrolments and guesses: every
// acknowledged operation survives, no attempt count goes back up, and the
// daemon restarts only on a database that matches its HSM anchor.
import { describe, it, expect } from 'vitest';
import { crashCycles } from '../helpers/crash.js';

// Three cycles here; ./scripts/crash-soak runs as many as you ask for, with other seeds.
describe('crash safety', () => {
  it('loses nothing acknowledged and never lowers a counter across 3 SIGKILLs', async () => {
    const reports = await crashCycles({ seed: 20261126, cycles: 3, users: 12 });
    expect(reports).toHaveLength(3);
    expect(reports.reduce((n, r) => n + r.acknowledged, 0)).toBeGreaterThan(15);
    expect(reports.flatMap((r) => r.violations)).toEqual([]);
  }, 180_000);
});
