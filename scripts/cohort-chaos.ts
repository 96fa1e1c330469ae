// Seeded chaos run against a real 3-node cohort (issue 17; docs/COHORT.md
// "Chaos run"). Not part of the suite: it runs for minutes.
//
//   npx tsx scripts/cohort-chaos.ts [--minutes 10] [--seed 1] [--workers 6] [--keep]
//   (or ./scripts/cohort-chaos, which builds first)
//
// Starts its own cohort with ./scripts/cohort (3 etcd members, 3 vault nodes,
// own folder and ports), then, while clients enrol, guess wrong and recover
// through the SDK's fail-over over all three URLs, injects one fault at a time:
// kill -9 of a vault node, kill -9 of an etcd member (the leader or not), or a
// wipe of a node's replica; each is repaired a few seconds later
// (./scripts/cohort up restarts what is down). One fault at a time keeps a
// quorum, which is what the cohort promises to survive.
//
// What it checks, per user (each user is driven by one client, one step at a
// time, so the model is exact up to steps whose outcome the SDK reports as
// unknown):
//   - never more acknowledged wrong guesses than the limit between two successes;
//   - a record destroyed only once acknowledged + unknown guesses reach the limit;
//   - every acknowledged success returned the enrolled key;
//   - no acknowledged enrolment or counter update lost: at the end each live user
//     is active with limit - acknowledged wrong <= attemptsLeft <= that + unknown;
//   - no destroyed record revived (checked during the run and at the end). A LOCKED
//     answer while another counted guess is pending (say, on a node that was killed)
//     leaves the record active with 0 attempts left until that guess expires; that is
//     not a revival, one with attempts left is.
// Prints one JSON report; exit 1 on any violation.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { VaultClient } from '../client/sdk.js';
import { webSocketTransports } from '../client/transport.js';
import { readVaultKey } from '../client/cli.js';
import { isVaultError, ErrorCodes, VaultError } from '../protocol/errors.js';

const ROOT = resolve(import.meta.dirname, '..');
const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const MINUTES = arg('minutes', 10);
const SEED = arg('seed', 1);
const WORKERS = arg('workers', 6);
const KEEP = process.argv.includes('--keep');
const OFFSET = arg('port-offset', 300);
const LIMIT = 10;

// mulberry32: one seeded stream for the fault schedule, one per client.
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const dir = mkdtempSync(join(tmpdir(), 'bkv-chaos-'));
const env = { ...process.env, BKV_COHORT_DIR: dir, BKV_COHORT_PORT_OFFSET: String(OFFSET) };
function cohort(...args: string[]): void {
  const r = spawnSync(join(ROOT, 'scripts/cohort'), args, { env, encoding: 'utf8', cwd: ROOT });
  if (r.status !== 0) throw new Error(`scripts/cohort ${args.join(' ')} failed (${r.status}): ${r.stderr.slice(-2000)}`);
}
const pidOf = (f: string): number | undefined => (existsSync(f) ? Number(readFileSync(f, 'utf8').trim()) : undefined);

interface User {
  id: string;
  password: string;
  key: Uint8Array;
  state: 'new' | 'enrolled' | 'destroyed';
  wrongAcked: number;
  unknown: number;
}

const violations: string[] = [];
const ops: Record<string, number> = {};
const count = (k: string) => (ops[k] = (ops[k] ?? 0) + 1);
let maxLatencyMs = 0;
const faults: { at: number; kind: string; target: number; firstOkAfterMs?: number }[] = [];
let lastOk = Date.now();

function classify(e: unknown): 'unknown' | string {
  if (!isVaultError(e)) return 'unknown';
  if ((e.detail as Record<string, unknown> | undefined)?.outcomeUnknown) return 'unknown';
  return e.code;
}

async function step(c: VaultClient, u: User, r: () => number): Promise<void> {
  const t0 = Date.now();
  const done = (what: string) => {
    count(what);
    const ms = Date.now() - t0;
    maxLatencyMs = Math.max(maxLatencyMs, ms);
    lastOk = Date.now();
    for (const f of faults) if (f.firstOkAfterMs === undefined) f.firstOkAfterMs = lastOk - f.at;
  };
  if (u.state === 'new') {
    try {
      await c.enrollPassword(u.id, u.password, u.key);
      u.state = 'enrolled';
      done('enrol');
    } catch (e) {
      const k = classify(e);
      count(`enrol:${k}`);
      // Unknown: it may have landed. The next status settles it.
      if (k === 'unknown' || k === ErrorCodes.RECORD_EXISTS) {
        const s = await c.status(u.id).catch(() => undefined);
        if (s?.state === 'active') u.state = 'enrolled';
      }
    }
    return;
  }
  if (u.state === 'destroyed') {
    const s = await c.status(u.id).catch(() => undefined);
    if (s) {
      done('status');
      // LOCKED while another counted guess is still pending leaves the record active with no
      // attempt left until that guess is decided or expires (core/machine.ts); revived means usable.
      if (s.state === 'active' && s.attemptsLeft > 0) violations.push(`${u.id}: destroyed, then active again with ${s.attemptsLeft} attempts`);
    }
    return;
  }
  // Mostly wrong, so that records reach the limit too and the destroy path runs.
  const right = r() < 0.12;
  try {
    const key = await c.recoverWithPassword(u.id, right ? u.password : `wrong-${r()}`);
    if (!right) violations.push(`${u.id}: a wrong password recovered a key`);
    else if (Buffer.compare(Buffer.from(key), Buffer.from(u.key)) !== 0) violations.push(`${u.id}: success returned another key`);
    u.wrongAcked = 0;
    u.unknown = 0;
    done('recover-ok');
  } catch (e) {
    const k = classify(e);
    if (k === ErrorCodes.WRONG_PASSWORD) {
      if (right) violations.push(`${u.id}: the right password was refused as wrong`);
      u.wrongAcked++;
      if (u.wrongAcked > LIMIT) violations.push(`${u.id}: ${u.wrongAcked} wrong guesses acknowledged, limit ${LIMIT}`);
      done('recover-wrong');
    } else if (k === ErrorCodes.LOCKED || k === ErrorCodes.RECORD_NOT_FOUND) {
      if (u.wrongAcked + u.unknown + (right ? 0 : 1) < LIMIT) {
        violations.push(`${u.id}: destroyed after ${u.wrongAcked} acknowledged + ${u.unknown} unknown guesses (limit ${LIMIT})`);
      }
      u.state = 'destroyed';
      done('locked');
    } else {
      // Unavailable after every node, or unknown: the guess may have counted.
      u.unknown++;
      count(`recover:${k}`);
    }
  }
}

async function client(n: number, urls: string, token: string, pinnedKey: Uint8Array, until: number): Promise<User[]> {
  const r = rng(SEED * 1000 + n);
  const c = new VaultClient({ transports: webSocketTransports(urls, { token, connectTimeoutMs: 1000, timeoutMs: 10_000 }), pinnedKey, failover: { maxAttempts: 9 } });
  const users: User[] = [];
  let next = 0;
  const fresh = (): User => {
    const u: User = { id: `chaos-${SEED}-${n}-${next++}`, password: `pw-${n}-${next}-${Math.floor(r() * 1e9)}`, key: new Uint8Array(32).map(() => Math.floor(r() * 256)), state: 'new', wrongAcked: 0, unknown: 0 };
    users.push(u);
    return u;
  };
  for (let i = 0; i < 4; i++) fresh();
  while (Date.now() < until) {
    const live = users.filter((u) => u.state !== 'destroyed');
    if (live.length < 4) fresh();
    const u = r() < 0.05 ? users[Math.floor(r() * users.length)]! : live[Math.floor(r() * live.length)] ?? fresh();
    await step(c, u, r);
  }
  c.close();
  return users;
}

async function finalCheck(users: User[], urls: string, token: string, pinnedKey: Uint8Array): Promise<void> {
  const c = new VaultClient({ transports: webSocketTransports(urls, { token }), pinnedKey, failover: { maxAttempts: 9 } });
  for (const u of users) {
    const s = await c.status(u.id);
    if (u.state === 'destroyed' && s.state === 'active' && s.attemptsLeft > 0) violations.push(`${u.id}: destroyed, active with ${s.attemptsLeft} attempts at the end`);
    if (u.state === 'enrolled') {
      if (s.state !== 'active') {
        if (u.wrongAcked + u.unknown < LIMIT) violations.push(`${u.id}: acknowledged enrolment is ${s.state} at the end`);
      } else {
        const hi = LIMIT - u.wrongAcked;
        if (s.attemptsLeft > hi) violations.push(`${u.id}: ${s.attemptsLeft} attempts left, but ${u.wrongAcked} wrong guesses were acknowledged (a counter update lost)`);
        if (s.attemptsLeft < hi - u.unknown) violations.push(`${u.id}: ${s.attemptsLeft} attempts left, below ${hi} - ${u.unknown} unknown`);
      }
    }
  }
  c.close();
}

async function main(): Promise<void> {
  const started = Date.now();
  cohort('up');
  const envFile = Object.fromEntries(
    readFileSync(join(dir, 'cohort.env'), 'utf8')
      .trim()
      .split('\n')
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  ) as Record<string, string>;
  const urls = envFile.BKV_VAULT!;
  const token = envFile.BKV_TOKEN!;
  const pinnedKey = readVaultKey(envFile.BKV_VAULT_KEY!);
  const until = Date.now() + MINUTES * 60_000;
  const clients = Array.from({ length: WORKERS }, (_, i) => client(i, urls, token, pinnedKey, until));

  // The fault schedule: one at a time, repaired before the next.
  const r = rng(SEED);
  let wiped = false;
  while (Date.now() < until - 20_000) {
    await new Promise((res) => setTimeout(res, 4000 + r() * 4000));
    const target = 1 + Math.floor(r() * 3);
    const roll = r();
    const kind = !wiped && Date.now() > started + (MINUTES * 60_000) / 2 ? 'wipe-node' : roll < 0.55 ? 'kill-node' : roll < 0.95 ? 'kill-etcd' : 'wipe-node';
    const at = Date.now();
    faults.push({ at, kind, target });
    if (kind === 'kill-node') {
      const pid = pidOf(join(dir, `node${target}.pid`));
      if (pid) process.kill(pid, 'SIGKILL');
    } else if (kind === 'kill-etcd') {
      const pid = pidOf(join(dir, 'etcd', `m${target}.pid`));
      if (pid) process.kill(pid, 'SIGKILL');
    } else {
      wiped = true;
      cohort('wipe', String(target));
    }
    await new Promise((res) => setTimeout(res, 2000 + r() * 3000));
    cohort('up');
  }
  const users = (await Promise.all(clients)).flat();
  await finalCheck(users, urls, token, pinnedKey);
  const report = {
    seed: SEED,
    minutes: MINUTES,
    clients: WORKERS,
    users: users.length,
    destroyed: users.filter((u) => u.state === 'destroyed').length,
    ops,
    faults: faults.reduce<Record<string, number>>((a, f) => ((a[f.kind] = (a[f.kind] ?? 0) + 1), a), {}),
    firstSuccessAfterFaultMs: {
      median: median(faults.map((f) => f.firstOkAfterMs ?? Infinity)),
      max: Math.max(...faults.map((f) => f.firstOkAfterMs ?? Infinity)),
    },
    maxStepLatencyMs: maxLatencyMs,
    violations: violations.slice(0, 50),
    violationCount: violations.length,
  };
  console.log(JSON.stringify(report, null, 2));
  if (violations.length) process.exitCode = 1;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor(s.length / 2)]! : NaN;
}

main()
  .catch((e: unknown) => {
    console.error(`cohort-chaos: ${e instanceof VaultError ? `${e.code}: ` : ''}${(e as Error).message}`);
    process.exitCode = 1;
  })
  .finally(() => {
    try {
      cohort('down');
    } catch {
      /* already down */
    }
    if (!KEEP) rmSync(dir, { recursive: true, force: true });
    else console.error(`cohort-chaos: kept ${dir}`);
  });
