// The HSM ceiling: the exact PKCS#11 call sequence of one recovery, driven
// directly through the vault's Token class from N worker threads (one session
// each, as the daemon's HSM pool), with no network, no database and no event
// loop in the way:
//
//   recover.begin   C_DeriveKey(kx, E) + C_GetAttributeValue + C_DestroyObject   channel handshake
//                   C_DeriveKey(oprf, B) + C_GetAttributeValue + C_DestroyObject OPRF evaluation
//   recover.finish  C_VerifyInit + C_Verify (HMAC-SHA256)                        verifier check
//                   C_DecryptInit + C_Decrypt (AES-256-GCM)                      unseal
//   (anchor)        C_SetAttributeValue(CKA_LABEL) per group commit              `anchorEvery` recoveries
//
//   node dist/bench/hsm-ceiling.js '{"dataDir":"...","threads":2,"seconds":5,"anchorEvery":0}'
//   node dist/bench/hsm-ceiling.js '{"dataDir":"...","singleOps":true,"seconds":2}'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { createECDH, randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import pino from 'pino';
import { Token, pinLibrary, type TokenConfig } from '../vault/hsm/token.js';
import { enforcePolicy } from '../hsm-policy/enforce.js';
import { loadConfig } from '../vault/config.js';
import { initVault, tokenConfig } from '../vault/setup.js';
import { anchorLabel } from '../vault/core/state-hash.js';
import { emit } from './lib/proc.js';

interface Job {
  cfg: TokenConfig;
  seconds: number;
  anchorEvery: number;
  /** One call kind at a time instead of the recovery sequence. */
  op?: 'ecdh' | 'verify' | 'decrypt' | 'anchor' | 'sign' | 'hmac';
  start: number;
}

interface ThreadResult {
  recoveries: number;
  seconds: number;
  /** CPU this thread used in the measured window, in µs; null where Linux's per-thread counters are not readable. */
  cpuUs: number | null;
}

/**
 * CPU time of the calling thread (user + system), in µs, from /proc/thread-self/stat
 * (clock ticks of 10 ms: ±0.2 % over a 5 s window). Node 20 has no per-thread
 * cpuUsage, and process.cpuUsage() would count the other threads too.
 */
function threadCpuUs(): number | null {
  try {
    const stat = readFileSync('/proc/thread-self/stat', 'utf8');
    // Fields after the command name, which is in parentheses and may hold spaces: utime is the 14th field, stime the 15th.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1e6) / 100;
  } catch {
    return null;
  }
}

function worker(job: Job): ThreadResult {
  pinLibrary(job.cfg.modulePath);
  const token = Token.open({ ...job.cfg, maxSessions: 2 });
  const keys = enforcePolicy(token, { create: false });
  const e = createECDH('prime256v1');
  e.generateKeys();
  const E = new Uint8Array(e.getPublicKey());
  e.generateKeys();
  const B = new Uint8Array(e.getPublicKey());
  const input = randomBytes(120);
  const mac = token.hmacSha256(keys.verifier, input);
  const seal = keys.seals.get(Math.max(...keys.seals.keys()))!;
  const iv = randomBytes(12);
  const aad = randomBytes(150);
  const sealed = token.aesGcmEncrypt(seal, iv, aad, randomBytes(60));
  const label = anchorLabel(1, randomBytes(32));
  const digest = randomBytes(32);
  const one: () => void =
    job.op === undefined
      ? () => {
          token.ecdhX(keys.kx.priv, E);
          token.ecdhX(keys.oprf.priv, B);
          if (!token.hmacSha256Verify(keys.verifier, input, mac)) throw new Error('verify failed');
          if (!token.aesGcmDecrypt(seal, iv, aad, sealed)) throw new Error('decrypt failed');
        }
      : {
          ecdh: () => void token.ecdhX(keys.oprf.priv, B),
          verify: () => void token.hmacSha256Verify(keys.verifier, input, mac),
          decrypt: () => void token.aesGcmDecrypt(seal, iv, aad, sealed),
          anchor: () => token.setLabel(keys.anchors[0], label),
          sign: () => void token.ecdsaSign(keys.sig.priv, digest),
          hmac: () => void token.hmacSha256(keys.verifier, input),
        }[job.op];
  // Start together, so every thread's measured window overlaps the others'.
  while (Date.now() < job.start) {
    /* spin briefly */
  }
  const t0 = performance.now();
  const cpu0 = threadCpuUs();
  const end = t0 + job.seconds * 1000;
  let n = 0;
  while (performance.now() < end) {
    for (let i = 0; i < 20; i++) {
      one();
      n++;
      if (job.anchorEvery > 0 && n % job.anchorEvery === 0) token.setLabel(keys.anchors[0], label);
    }
  }
  const seconds = (performance.now() - t0) / 1000;
  const cpu1 = threadCpuUs();
  token.dropSessions();
  return { recoveries: n, seconds, cpuUs: cpu0 !== null && cpu1 !== null ? cpu1 - cpu0 : null };
  // (the thread ends after posting; its pin keeps the library up for the others)
}

/** Calls (or recoveries) per second over all threads, and the CPU each one cost (µs, null if unknown). */
async function run(cfg: TokenConfig, threads: number, seconds: number, anchorEvery: number, op?: Job['op']): Promise<{ rate: number; cpuUsPerOp: number | null }> {
  const start = Date.now() + 300;
  const results = await Promise.all(
    Array.from({ length: threads }, () => {
      const w = new Worker(new URL(import.meta.url), { workerData: { cfg, seconds, anchorEvery, op, start } satisfies Job });
      return new Promise<ThreadResult>((res, rej) => {
        let result: ThreadResult | undefined;
        w.once('message', (m) => (result = m));
        w.once('error', rej);
        // Resolve only once the thread is gone: no PKCS#11 call may outlive the run.
        w.once('exit', () => (result ? res(result) : rej(new Error('ceiling worker ended without a result'))));
      });
    }),
  );
  const done = results.reduce((a, r) => a + r.recoveries, 0);
  const cpu = results.every((r) => r.cpuUs !== null) ? results.reduce((a, r) => a + r.cpuUs!, 0) : null;
  return { rate: results.reduce((a, r) => a + r.recoveries / r.seconds, 0), cpuUsPerOp: cpu === null ? null : Math.round((cpu / Math.max(1, done)) * 10) / 10 };
}

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2]!) as { dataDir: string; threads?: number; seconds?: number; anchorEvery?: number; singleOps?: boolean };
  const log = pino({ level: 'warn' });
  const c = loadConfig({ env: {}, overrides: { dataDir: spec.dataDir } });
  // A token with the vault's key set, made once; never opened as a vault afterwards
  // (the single-call run moves its anchor).
  if (!existsSync(join(spec.dataDir, 'vault-key.pub'))) await initVault(c, log);
  const cfg = tokenConfig(c);
  // This process owns the library for as long as its workers run; never finalised before exit.
  pinLibrary(cfg.modulePath);
  {
    if (spec.singleOps) {
      const ops: Record<string, number> = {};
      for (const op of ['ecdh', 'verify', 'decrypt', 'hmac', 'sign', 'anchor'] as const) ops[op] = Math.round((await run(cfg, 1, spec.seconds ?? 2, 0, op)).rate);
      emit({ result: { singleThreadOpsPerSec: ops } });
    } else {
      const { rate, cpuUsPerOp } = await run(cfg, spec.threads ?? 2, spec.seconds ?? 5, spec.anchorEvery ?? 0);
      emit({ result: { threads: spec.threads ?? 2, anchorEvery: spec.anchorEvery ?? 0, recoveriesPerSec: Math.round(rate), cpuUsPerRecovery: cpuUsPerOp } });
    }
  }
  setImmediate(() => process.exit(0));
}

if (isMainThread) {
  main().catch((e: unknown) => {
    emit({ error: (e as Error).message, fatal: true });
    process.exit(1);
  });
} else {
  parentPort!.postMessage(worker(workerData as Job));
  parentPort!.close();
}
