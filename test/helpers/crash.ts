// Seeded crash-consistency driver: a stream of concurrent operations against
// the real daemon, SIGKILL at a seeded moment, restart, and a check of every
// acknowledged operation against what the vault reports. Shared by the test
// suite (a few cycles) and scripts/crash-soak (many).
import { randomBytes } from 'node:crypto';
import { readVaultKey } from '../../client/cli.js';
import { startDaemon, type RunningDaemon } from './daemon.js';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport } from '../../client/transport.js';
import { VaultError } from '../../protocol/errors.js';
import { TEST_KDF } from './vault.js';

/** mulberry32: small, seedable, good enough to pick operations and delays. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** What the acknowledged history of one user says the vault must hold. */
interface Model {
  password: string;
  key: Uint8Array;
  /** Enrolment acknowledged. */
  enrolled: boolean;
  locked: boolean;
  /** attemptsLeft after the last acknowledged operation. */
  left: number;
  /** An operation was in flight at the kill: it may or may not have happened. */
  inFlight: 'enroll' | 'guess' | undefined;
}

export interface CycleReport {
  cycle: number;
  killedAfterMs: number;
  acknowledged: number;
  violations: string[];
}

const LIMIT = 10;

function pinnedKey(d: RunningDaemon): Uint8Array {
  return readVaultKey(d.vaultKeyFile);
}

export async function crashCycles(opts: { seed: number; cycles: number; users: number; log?: (r: CycleReport) => void }): Promise<CycleReport[]> {
  const rand = rng(opts.seed);
  const users = new Map<string, Model>();
  for (let i = 0; i < opts.users; i++) {
    users.set(`u${opts.seed}-${i}`, {
      password: `pw-${i}-${opts.seed}`,
      key: new Uint8Array(randomBytes(32)),
      enrolled: false,
      locked: false,
      left: LIMIT,
      inFlight: undefined,
    });
  }
  let d = await startDaemon();
  const reports: CycleReport[] = [];
  try {
    for (let cycle = 0; cycle < opts.cycles; cycle++) {
      const transport = new WebSocketTransport({ url: d.url, token: d.token, timeoutMs: 5_000 });
      const client = new VaultClient({ transport, pinnedKey: pinnedKey(d), kdf: TEST_KDF, maxRetries: 0 });
      let acknowledged = 0;
      let stop = false;
      // One operation in flight per user, all users concurrently: each user's acknowledged history is linear.
      const workers = [...users].map(async ([userId, m]) => {
        while (!stop && !m.locked) {
          const roll = rand();
          try {
            if (!m.enrolled) {
              m.inFlight = 'enroll';
              await client.enrollPassword(userId, m.password, m.key);
              m.enrolled = true;
              m.left = LIMIT;
            } else if (roll < 0.75) {
              m.inFlight = 'guess';
              await client.recoverWithPassword(userId, 'wrong-' + roll);
            } else {
              m.inFlight = 'guess';
              const k = await client.recoverWithPassword(userId, m.password);
              if (!Buffer.from(k).equals(Buffer.from(m.key))) throw new Error(`${userId}: recovered a different key`);
              m.left = LIMIT;
            }
            m.inFlight = undefined;
            acknowledged++;
          } catch (e) {
            if (!(e instanceof VaultError)) throw e;
            if (e.code === 'WRONG_PASSWORD') {
              m.left = Number(e.detail?.attemptsLeft);
              m.inFlight = undefined;
              acknowledged++;
            } else if (e.code === 'LOCKED') {
              m.locked = true;
              m.left = 0;
              m.inFlight = undefined;
              acknowledged++;
            } else {
              // The daemon died under us: the outcome of this one is unknown.
              return;
            }
          }
        }
      });
      // Kill after a seeded number of acknowledged operations plus a seeded delay:
      // the cut lands at arbitrary points of the concurrent stream, however fast
      // or loaded the machine is.
      const started = Date.now();
      const ackTarget = 4 + Math.floor(rand() * 20);
      while (acknowledged < ackTarget && Date.now() - started < 30_000) await new Promise((r) => setTimeout(r, 5));
      await new Promise((r) => setTimeout(r, Math.round(rand() * 40)));
      const killedAfterMs = Date.now() - started;
      await d.stop('SIGKILL');
      stop = true;
      await Promise.allSettled(workers);
      transport.close();

      d = await d.restart();
      const check = new VaultClient({
        transport: new WebSocketTransport({ url: d.url, token: d.token }),
        pinnedKey: pinnedKey(d),
        kdf: TEST_KDF,
      });
      const violations: string[] = [];
      for (const [userId, m] of users) {
        const s = await check.status(userId);
        const guessPending = m.inFlight === 'guess';
        if (m.locked) {
          if (s.state !== 'locked') violations.push(`${userId}: acknowledged lockout but state is ${s.state}`);
        } else if (m.enrolled) {
          // Never more attempts than acknowledged; at most the one in-flight guess fewer.
          const lowest = guessPending ? m.left - 1 : m.left;
          if (s.state === 'locked' && guessPending && m.left === 1) {
            m.locked = true;
          } else if (s.state !== 'active') violations.push(`${userId}: acknowledged enrolment but state is ${s.state}`);
          else if (s.attemptsLeft > m.left || s.attemptsLeft < lowest) {
            violations.push(`${userId}: attemptsLeft ${s.attemptsLeft}, acknowledged ${m.left}${guessPending ? ' (one guess in flight)' : ''}`);
          }
          m.left = s.attemptsLeft;
        } else if (m.inFlight === 'enroll') {
          if (s.state === 'active') {
            m.enrolled = true;
            m.left = s.attemptsLeft;
          }
        } else if (s.state !== 'absent') violations.push(`${userId}: never enrolled but state is ${s.state}`);
        m.inFlight = undefined;
      }
      check.close();
      const report = { cycle, killedAfterMs, acknowledged, violations };
      reports.push(report);
      opts.log?.(report);
      // Let some users start over so lockouts don't end the stream early.
      for (const m of users.values()) if (m.locked && rand() < 0.5) Object.assign(m, { locked: false, enrolled: false, left: LIMIT });
      for (const [userId, m] of users) if (!m.enrolled && !m.locked) await deleteIfPresent(d, userId);
    }
  } finally {
    await d.cleanup();
  }
  return reports;
}

async function deleteIfPresent(d: RunningDaemon, userId: string): Promise<void> {
  const t = new WebSocketTransport({ url: d.url, token: d.token });
  try {
    await t.call('record.delete', { userId });
  } catch {
    /* absent already */
  } finally {
    t.close();
  }
}
