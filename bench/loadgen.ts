// The load generator: a separate process that drives a vault (or the OPAQUE
// reference peer) over WebSocket and reports throughput and latency as JSON.
//
//   node dist/bench/loadgen.js '<json spec>'     (see Spec below)
//
// Closed loop (`concurrency` flows back to back) measures the maximum rate;
// open loop (Poisson arrivals at `rate`/s) measures latency at a given load,
// timed from each flow's scheduled start so queueing is not hidden
// (no coordinated omission). A flow is a whole recovery, enrolment or login
// (two round trips each). The first `warmupSec` are not counted.
import { createPublicKey } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import * as opaque from '@serenity-kit/opaque';
import { RpcPool, type Rpc } from './lib/rpc.js';
import { codeOf, enrollOnce, fetchVault, LeanChannel, recoverOnce, syntheticUser, type FlowContext } from './lib/vault-client.js';
import { latency, round } from './lib/stats.js';
import { emit } from './lib/proc.js';
import { BENCH_KDF } from './lib/config.js';
import { VaultClient } from '../client/sdk.js';
import { webSocketTransports } from '../client/transport.js';

export interface Spec {
  target: 'vault' | 'peer' | 'sdk';
  op: 'enroll' | 'recover' | 'register' | 'login';
  /** One URL, or (sdk target) the nodes of one vault comma-separated: each SDK client fails over between them. */
  url: string;
  token?: string;
  /** sdk: the pinned vault key file. */
  vaultKeyFile?: string;
  /** Users [from, to): enrol/register walk the range once; recover/login pick at random. */
  from: number;
  to: number;
  load: { type: 'closed'; concurrency: number; seconds?: number; count?: number } | { type: 'open'; rate: number; seconds: number };
  warmupSec?: number;
  connections?: number;
  /** Emit {progress} every this many completed flows. */
  progressEvery?: number;
  /** Argon2id of SDK clients and OPAQUE clients. */
  kdf?: { m: number; t: number; p: number };
  /** Write every counted flow as a JSON line [arrival (epoch ms), latency ms] here, to find where a tail comes from. */
  timelineFile?: string;
}

type Flow = (i: number) => Promise<void>;

const KDF = { m: BENCH_KDF.m, t: BENCH_KDF.t, p: BENCH_KDF.p };

async function setup(spec: Spec): Promise<{ flow: Flow; close: () => void; failovers?: () => number }> {
  const kdf = { alg: 'argon2id' as const, ...(spec.kdf ?? KDF) };
  if (spec.target === 'vault') {
    const pool = await RpcPool.open(spec.url, spec.connections ?? 4, spec.token);
    const vault = await fetchVault(pool.conns[0]!);
    const ctx: FlowContext = { vault, salt: LeanChannel.salt(vault), kdf };
    const run = spec.op === 'enroll' ? enrollOnce : recoverOnce;
    return { flow: (i) => run(pool.pick(), ctx, syntheticUser(i)), close: () => pool.close() };
  }
  if (spec.target === 'sdk') {
    const jwk = createPublicKey(readFileSync(spec.vaultKeyFile!)).export({ format: 'jwk' });
    const pinnedKey = new Uint8Array(Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]));
    // Fail-overs are counted, not hidden: a run through a node kill reports how many flows moved.
    let failovers = 0;
    const clients = Array.from({ length: spec.connections ?? 4 }, () => {
      const transports = webSocketTransports(spec.url, { ...(spec.token ? { token: spec.token } : {}), timeoutMs: 60_000 });
      return new VaultClient({ transports, pinnedKey, kdf, maxRetries: 0, failover: { onFailover: () => void failovers++ } });
    });
    let next = 0;
    const key = (i: number) => new Uint8Array(32).fill(i & 0xff);
    const flow: Flow =
      spec.op === 'enroll'
        ? async (i) => void (await clients[next++ % clients.length]!.enrollPassword(`s${i}`, `password-${i}`, key(i)))
        : async (i) => {
            const k = await clients[next++ % clients.length]!.recoverWithPassword(`s${i}`, `password-${i}`);
            if (!Buffer.from(k).equals(Buffer.from(key(i)))) throw Object.assign(new Error('wrong key'), { code: 'WRONG_RESULT' });
          };
    return { flow, close: () => clients.forEach((c) => c.close()), failovers: () => failovers };
  }
  // The OPAQUE reference peer.
  await opaque.ready;
  const pool = await RpcPool.open(spec.url, spec.connections ?? 4);
  const keyStretching = { 'argon2id-custom': { iterations: kdf.t, memory: kdf.m, parallelism: kdf.p } };
  const password = (i: number) => `password-${i}`;
  const flow: Flow =
    spec.op === 'register'
      ? async (i) => {
          const rpc = pool.pick();
          const userId = `p${i}`;
          const s = opaque.client.startRegistration({ password: password(i) });
          const r = (await rpc.call('register.start', { userId, request: s.registrationRequest })) as { response: string };
          const f = opaque.client.finishRegistration({
            password: password(i),
            registrationResponse: r.response,
            clientRegistrationState: s.clientRegistrationState,
            keyStretching,
          });
          await rpc.call('register.finish', { userId, record: f.registrationRecord });
        }
      : async (i) => {
          const rpc: Rpc = pool.pick();
          const userId = `p${i}`;
          const s = opaque.client.startLogin({ password: password(i) });
          const r = (await rpc.call('login.start', { userId, request: s.startLoginRequest })) as { session: string; response: string };
          const f = opaque.client.finishLogin({ clientLoginState: s.clientLoginState, loginResponse: r.response, password: password(i), keyStretching });
          if (!f) throw Object.assign(new Error('login refused by the client'), { code: 'WRONG_RESULT' });
          const done = (await rpc.call('login.finish', { session: r.session, request: f.finishLoginRequest })) as { ok: boolean };
          if (!done.ok) throw Object.assign(new Error('login refused'), { code: 'WRONG_RESULT' });
        };
  return { flow, close: () => pool.close() };
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2]!) as Spec;
  const { flow, close, failovers } = await setup(spec);
  const walk = spec.op === 'enroll' || spec.op === 'register';
  const range = spec.to - spec.from;
  let cursor = spec.from;
  const busy = new Set<number>();
  // Recoveries pick a random user not already in flight (a user's concurrent guesses would count against each other).
  const pick = (): number => {
    if (walk) return cursor++;
    for (;;) {
      const i = spec.from + Math.floor(Math.random() * range);
      if (!busy.has(i) || busy.size >= range) return i;
    }
  };
  const warmupMs = (spec.warmupSec ?? (spec.load.type === 'open' ? 1 : 1)) * 1000;
  const samples: number[] = [];
  const arrivals: number[] = [];
  const errors: Record<string, number> = {};
  let done = 0;
  let counted = 0;
  let measureStart = 0;
  let measureEnd = 0;
  const started = performance.now();
  const cpu0 = process.cpuUsage();
  const progressEvery = spec.progressEvery ?? 0;

  const one = async (scheduled: number): Promise<void> => {
    const i = pick();
    busy.add(i);
    try {
      await flow(i);
      const end = performance.now();
      if (scheduled >= measureStart && measureStart > 0 && (measureEnd === 0 || end <= measureEnd)) {
        samples.push(end - scheduled);
        if (spec.timelineFile) arrivals.push(performance.timeOrigin + scheduled);
        counted++;
      }
      done++;
      if (progressEvery && done % progressEvery === 0) emit({ progress: done, t: Math.round(performance.now() - started) });
    } catch (e) {
      const code = codeOf(e);
      errors[code] = (errors[code] ?? 0) + 1;
      if (walk) done++;
    } finally {
      busy.delete(i);
    }
  };

  if (spec.load.type === 'closed') {
    const load = spec.load;
    const count = load.count ?? (walk ? range : Infinity);
    const timed = load.seconds !== undefined;
    measureStart = timed ? started + warmupMs : started;
    const stopAt = timed ? measureStart + load.seconds! * 1000 : Infinity;
    if (timed) measureEnd = stopAt;
    let issued = 0;
    await Promise.all(
      Array.from({ length: load.concurrency }, async () => {
        while (issued < count && performance.now() < stopAt) {
          issued++;
          await one(performance.now());
        }
      }),
    );
    measureEnd = timed ? stopAt : performance.now();
  } else {
    const { rate, seconds } = spec.load;
    measureStart = started + warmupMs;
    const stopAt = measureStart + seconds * 1000;
    measureEnd = Infinity;
    const inflight = new Set<Promise<void>>();
    let t = started;
    // Poisson arrivals; each flow is timed from its scheduled arrival.
    const nextGap = () => (-Math.log(1 - Math.random()) * 1000) / rate;
    t += nextGap();
    while (t < stopAt) {
      const now = performance.now();
      while (t <= now && t < stopAt) {
        const p = one(t);
        inflight.add(p);
        void p.finally(() => inflight.delete(p));
        t += nextGap();
      }
      await new Promise((r) => setTimeout(r, Math.max(0, Math.min(5, t - performance.now()))));
    }
    await Promise.all(inflight);
    measureEnd = stopAt;
  }
  const cpu = process.cpuUsage(cpu0);
  if (spec.timelineFile) writeFileSync(spec.timelineFile, arrivals.map((a, i) => `[${round(a, 2)},${round(samples[i]!, 2)}]\n`).join(''));
  const seconds = (measureEnd - measureStart) / 1000;
  close();
  emit({
    result: {
      target: spec.target,
      op: spec.op,
      load: spec.load,
      ops: counted,
      total: done,
      seconds: round(seconds, 3),
      rate: round(counted / seconds, 1),
      errors,
      latencyMs: latency(samples),
      loadgenCpuMs: round((cpu.user + cpu.system) / 1000, 0),
      ...(failovers ? { failovers: failovers() } : {}),
    },
  });
  setImmediate(() => process.exit(0));
}

main().catch((e: unknown) => {
  emit({ error: (e as Error).message, fatal: true });
  process.exit(1);
});
