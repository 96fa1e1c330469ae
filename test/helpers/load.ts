// The mixed-load generator behind test/integration/adversarial-load.test.ts (a short run
// in the suite) and test/soak/load-memory.test.ts (long runs, RSS): many connections
// running enrol / recover (right and wrong) / status / delete at once, each answer
// checked against a model of what the vault must have done.
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { startDaemon, type RunningDaemon } from './daemon.js';
import { TEST_KDF } from './vault.js';
import { LeakScan, RecordingTransport, advConfig, pinnedKeyOf } from './adversarial.js';
import { VaultClient } from '../../client/sdk.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';

const USERS_PER_CONNECTION = 2;
const HOT_USERS = 5;
/** Wrong guesses the generator hands out per hot user, across all connections (below the limit). */
const HOT_TICKETS = 8;
/** Only a sample of the traffic is recorded (every frame of the first connections) to keep the scan cheap. */
const RECORDED = 5;

/** The daemon under load, the scan every secret the run makes is registered with, and the wire sample. */
export interface LoadContext {
  d: RunningDaemon;
  leaks: LeakScan;
  wire: string[];
}

/** A daemon for load (tenant rate limits out of the way), its logs and files under the leak scan. */
export async function startLoad(): Promise<LoadContext> {
  const d = await startDaemon({ config: advConfig({ limits: { tenantPerSec: 1e6, tenantBurst: 1e6 } }) });
  const ctx: LoadContext = { d, leaks: new LeakScan(), wire: [] };
  ctx.leaks.text('wire sample', () => ctx.wire);
  ctx.leaks.daemon(d);
  return ctx;
}

interface UserModel {
  id: string;
  pw: string;
  k: Uint8Array;
  enrolled: boolean;
  left: number;
}

export interface Stats {
  ops: Record<string, number>;
  retryable: Record<string, number>;
  violations: string[];
  latencies: number[];
}

async function worker(ctx: LoadContext, c: VaultClient, users: UserModel[], hot: { id: string; tickets: number; counted: number; pw: string }[], until: number, rand: () => number, s: Stats): Promise<void> {
  let i = 0;
  while (Date.now() < until) {
    const u = users[i++ % users.length]!;
    const roll = rand();
    const t0 = performance.now();
    let op = '';
    try {
      if (!u.enrolled) {
        op = 'enrol';
        await c.enrollPassword(u.id, u.pw, u.k);
        u.enrolled = true;
        u.left = 10;
      } else if (roll < 0.05) {
        const h = hot[Math.floor(rand() * hot.length)]!;
        if (h.tickets <= 0) continue;
        h.tickets--;
        op = 'hot-wrong';
        try {
          await c.recoverWithPassword(h.id, `hot-wrong-${roll}`);
          s.violations.push(`${h.id}: a wrong password recovered a key`);
        } catch (e) {
          if (e instanceof VaultError && e.code === ErrorCodes.WRONG_PASSWORD) h.counted++;
          else {
            h.tickets++; // not counted (retryable refusal): hand the ticket back
            throw e;
          }
        }
      } else if (roll < 0.3) {
        op = 'status';
        const st = await c.status(u.id);
        if (st.state !== 'active' || st.attemptsLeft !== u.left) s.violations.push(`${u.id}: status ${st.state}/${st.attemptsLeft}, expected active/${u.left}`);
      } else if (roll < 0.55 || u.left <= 2) {
        op = 'recover-right';
        const k = await c.recoverWithPassword(u.id, u.pw);
        if (!Buffer.from(k).equals(Buffer.from(u.k))) s.violations.push(`${u.id}: recovered another key`);
        u.left = 10;
      } else if (roll < 0.92) {
        op = 'recover-wrong';
        try {
          await c.recoverWithPassword(u.id, `wrong-${roll}`);
          s.violations.push(`${u.id}: a wrong password recovered a key`);
        } catch (e) {
          if (!(e instanceof VaultError) || e.code !== ErrorCodes.WRONG_PASSWORD) throw e;
          const left = Number(e.detail?.attemptsLeft);
          // Exactly one attempt per acknowledged wrong guess: a lost update shows as equal, a doubled one as two less.
          if (left !== u.left - 1) s.violations.push(`${u.id}: attemptsLeft ${left} after a wrong guess, expected ${u.left - 1}`);
          u.left = left;
        }
      } else {
        op = 'delete';
        await c.delete(u.id);
        u.enrolled = false;
        u.k = new Uint8Array(randomBytes(32));
        ctx.leaks.secret('K', u.k);
      }
      s.ops[op] = (s.ops[op] ?? 0) + 1;
      s.latencies.push(performance.now() - t0);
    } catch (e) {
      if (e instanceof VaultError && (e.detail?.retryable === true || e.code === ErrorCodes.OVERLOADED || e.code === ErrorCodes.RATE_LIMITED)) {
        // Retryable: guaranteed to have changed nothing, so the model stays as it is.
        s.retryable[`${op}:${e.code}`] = (s.retryable[`${op}:${e.code}`] ?? 0) + 1;
        await new Promise((r) => setTimeout(r, 20));
        continue;
      }
      s.violations.push(`${u.id} ${op}: ${e instanceof VaultError ? e.code : ''} ${(e as Error).message}`);
      return;
    }
  }
}

export async function loadRun(ctx: LoadContext, seconds: number, connections: number, prefix: string, s: Stats) {
  const pinned = pinnedKeyOf(ctx.d);
  const transports = Array.from({ length: connections }, (_, i) => new RecordingTransport(ctx.d.url, ctx.d.token, i < RECORDED ? ctx.wire : [], 60_000));
  const clients = transports.map((t) => new VaultClient({ transport: t, pinnedKey: pinned, kdf: TEST_KDF, maxRetries: 0 }));
  const hot = Array.from({ length: HOT_USERS }, (_, i) => ({ id: `${prefix}-hot-${i}`, tickets: HOT_TICKETS, counted: 0, pw: `hot-pw-${i}-${randomBytes(4).toString('hex')}` }));
  for (const h of hot) {
    ctx.leaks.secret('hot password', h.pw);
    await clients[0]!.enrollPassword(h.id, h.pw, new Uint8Array(randomBytes(32)));
  }
  const models = clients.map((_, c) =>
    Array.from({ length: USERS_PER_CONNECTION }, (_, j) => {
      const m: UserModel = { id: `${prefix}-c${c}-u${j}`, pw: `pw-${c}-${j}-${randomBytes(4).toString('hex')}`, k: new Uint8Array(randomBytes(32)), enrolled: false, left: 10 };
      ctx.leaks.secret('password', m.pw);
      ctx.leaks.secret('K', m.k);
      return m;
    }),
  );
  let seed = 20261127;
  const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const started = Date.now();
  await Promise.all(clients.map((c, i) => worker(ctx, c, models[i]!, hot, started + seconds * 1000, rand, s)));
  const elapsed = (Date.now() - started) / 1000;
  // Final state equals the model, read back on a fresh connection.
  const check = new VaultClient({ transport: new RecordingTransport(ctx.d.url, ctx.d.token, [], 60_000), pinnedKey: pinned, kdf: TEST_KDF });
  for (const m of models.flat()) {
    const st = await check.status(m.id);
    const want = m.enrolled ? { state: 'active', attemptsLeft: m.left } : { state: 'deleted', attemptsLeft: 0 };
    if (st.state === 'absent' && !m.enrolled) continue; // never enrolled in the run
    if (st.state !== want.state || st.attemptsLeft !== want.attemptsLeft) s.violations.push(`${m.id}: final ${st.state}/${st.attemptsLeft}, model ${want.state}/${want.attemptsLeft}`);
  }
  for (const h of hot) {
    const st = await check.status(h.id);
    if (st.attemptsLeft !== 10 - h.counted) s.violations.push(`${h.id}: ${h.counted} wrong guesses acknowledged across connections, vault says ${10 - st.attemptsLeft}`);
  }
  for (const t of transports) t.close();
  check.close();
  return { elapsed, hotCounted: hot.reduce((a, h) => a + h.counted, 0) };
}

/** User + system CPU seconds of a process so far (Linux /proc). */
export function cpuSecondsOf(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

