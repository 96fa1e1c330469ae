// The single-owner race of test/integration/single-owner.test.ts, long: 100 rounds of six
// starters racing for a data folder whose owner was SIGKILLed. Many process starts, so it runs
// in ./scripts/soak, not in the suite (which runs 8 rounds).
import { describe, it, expect, afterAll } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { raceForLock } from '../helpers/lock-race.js';

const work = mkdtempSync(join(tmpdir(), 'bkv-owner-soak-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe('starters racing after the owner was SIGKILLed, long', () => {
  it('6 starters, 100 rounds: exactly one owner every round', async () => {
    const ROUNDS = Number(process.env.BKV_RACE_ROUNDS ?? 100);
    expect(await raceForLock(work, ROUNDS)).toEqual(Array(ROUNDS).fill(1));
  }, 600_000);
});
