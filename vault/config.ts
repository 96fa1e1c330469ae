// Daemon configuration: defaults ← JSON or YAML file ← BKV_* environment ← flags,
// validated in one place with messages that name the field. The HSM PIN comes
// from a file or the environment, never from a flag (flags show up in `ps`).
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { z } from 'zod';
import { createRequire } from 'node:module';
import { VaultError, ErrorCodes } from '../protocol/errors.js';

// Loaded only for a YAML file: its ~70 modules cost every daemon, bkv-admin and ceremony
// start ~40 ms, and most configs are JSON.
const parseYaml = (text: string): unknown => (createRequire(import.meta.url)('yaml') as typeof import('yaml')).parse(text);

export const SOFTHSM_CANDIDATES = [
  '/usr/lib/softhsm/libsofthsm2.so',
  '/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so',
  '/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so',
];

// Spelled here as in store/tenants.ts and core/namespace.ts (config loads without the core).
const TENANT_NAME = /^[a-z0-9][a-z0-9_.-]{0,62}$/;
const NAMESPACE_NAME = /^(?:_legacy|[a-z0-9][a-z0-9_.-]{0,62})$/;
// As in cohort/etcd.ts validateEndpoints (which the daemon runs again at start); repeated
// here so config loads without the etcd client. No credentials in a URL.
const ETCD_ENDPOINT = /^https?:\/\/(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})\/?$/;

const Schema = z
  .object({
    dataDir: z.string().min(1),
    listen: z.object({ host: z.string().min(1), port: z.number().int().min(0).max(65535) }).strict(),
    tls: z.object({ certFile: z.string().min(1), keyFile: z.string().min(1) }).strict().optional(),
    hsm: z
      .object({
        /** Omit for the embedded SoftHSM2 token under dataDir. */
        module: z.string().min(1).optional(),
        tokenLabel: z.string().min(1).max(32),
        pinFile: z.string().min(1).optional(),
        /** Security Officer PIN, for the key ceremony's trust step only (bkv-admin ceremony); the daemon never reads it. */
        soPinFile: z.string().min(1).optional(),
        /** C_Initialize library parameters, for modules configured that way (NSS softoken: configdir=…). */
        libraryParameters: z.string().min(1).max(65536).optional(),
        /**
         * Serve although the capability check could wrap vault keys out of the token
         * (NSS softoken ignores CKA_EXTRACTABLE=false). Shown in status and metrics.
         */
        acceptWrappableKeys: z.boolean().optional(),
        /**
         * How the daemon drives the HSM (docs/PERFORMANCE.md, "The HSM worker pool"): "off" on
         * the main thread, "auto" one worker thread per core, or a thread count. Tools always
         * use the main thread.
         */
        workers: z.union([z.enum(['off', 'auto']), z.number().int().min(1).max(256)]),
        /** ECDH jobs that may wait for a worker before new ones get OVERLOADED (default 256 per thread). */
        queue: z.number().int().min(1).optional(),
        /** ECDH derives between library recycles (SoftHSM keeps ~250 B per destroyed derive object); 0 = never. */
        recycleAfter: z.number().int().min(0).optional(),
        /** A worker of its own for anchor writes, so they never queue behind ECDH batches. */
        controlThread: z.boolean(),
      })
      .strict(),
    dbPath: z.string().min(1).optional(),
    /** SQLite. `checkpointWorker`: WAL checkpoints on a thread of their own (store/checkpointer.ts), off the event loop. */
    store: z.object({ checkpointWorker: z.boolean() }).strict(),
    vault: z
      .object({
        attemptLimit: z.number().int().min(1).max(1000),
        sessionTtlSec: z.number().int().min(5).max(3600),
        kdfFloor: z.object({ m: z.number().int().min(8), t: z.number().int().min(1), p: z.number().int().min(1) }).strict(),
      })
      .strict(),
    limits: z
      .object({
        tenantPerSec: z.number().positive(),
        tenantBurst: z.number().int().min(1),
        userPerMin: z.number().positive(),
        userBurst: z.number().int().min(1),
        maxPayloadBytes: z.number().int().min(1024).max(16 * 1024 * 1024),
        maxInFlight: z.number().int().min(1).max(10_000),
        idleSec: z.number().int().min(1),
        tokenMaxLifetimeSec: z.number().int().min(60),
        // Capacity of the in-memory tables, in all and per tenant (docs/OPERATIONS.md
        // "Limits and quotas"): a tenant past its share is refused, before any work, with
        // RATE_LIMITED; the vault past its total with OVERLOADED.
        maxSessions: z.number().int().min(2).max(10_000_000),
        tenantSessions: z.number().int().min(2),
        tenantEnrollments: z.number().int().min(1),
        maxChannels: z.number().int().min(2).max(10_000_000),
        tenantChannels: z.number().int().min(2),
        tenantClosedChannels: z.number().int().min(1).max(100_000_000),
        tenantConnections: z.number().int().min(1),
        userBucketsPerTenant: z.number().int().min(1).max(100_000_000),
      })
      .strict()
      .superRefine((l, ctx) => {
        const need = (ok: boolean, path: string, message: string) => {
          if (!ok) ctx.addIssue({ code: 'custom', path: [path], message });
        };
        need(l.tenantSessions <= l.maxSessions, 'tenantSessions', 'must be at most limits.maxSessions');
        // Room must stay for recoveries, however many enrolments a tenant leaves unfinished.
        need(l.tenantEnrollments < l.tenantSessions, 'tenantEnrollments', 'must be below limits.tenantSessions');
        need(l.tenantEnrollments <= Math.floor(l.maxSessions / 2), 'tenantEnrollments', 'must be at most half of limits.maxSessions');
        need(l.tenantChannels <= l.maxChannels, 'tenantChannels', 'must be at most limits.maxChannels');
        need(l.tenantEnrollments < l.tenantChannels, 'tenantEnrollments', 'must be below limits.tenantChannels');
      }),
    log: z.object({ level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']) }).strict(),
    /** Health, readiness, metrics and bkv-admin's endpoints (vault/admin/). Loopback by default. */
    admin: z.object({ host: z.string().min(1), port: z.number().int().min(0).max(65535) }).strict(),
    /** Hash-chained audit log (vault/audit/); `file` defaults to <dataDir>/audit.log. */
    audit: z
      .object({
        file: z.string().min(1).optional(),
        checkpointEvery: z.number().int().min(1).max(1_000_000),
        checkpointSec: z.number().int().min(1).max(86_400),
      })
      .strict(),
    /**
     * Record namespaces (vault/core/namespace.ts). A tenant acts in its home namespace (its own
     * name; "_legacy" for tenants from before namespaces); `grants` lists, per tenant, the other
     * namespaces it may name with a request's `namespace` param. Nothing else is reachable.
     * `isolate` lists tenants from before namespaces whose home becomes their own name
     * instead of "_legacy" (docs/OPERATIONS.md, "Namespaces").
     */
    tenants: z
      .object({
        grants: z
          .record(z.string(), z.array(z.string().regex(NAMESPACE_NAME, 'must be a tenant name or "_legacy"')).max(1000))
          .superRefine((g, ctx) => {
            for (const k of Object.keys(g)) {
              if (!TENANT_NAME.test(k)) {
                ctx.addIssue({ code: 'custom', path: [k], message: 'is not a tenant name (1-63 of a-z, 0-9, "_", ".", "-", starting with a letter or digit)' });
              }
            }
          }),
        isolate: z
          .array(z.string().regex(TENANT_NAME, 'is not a tenant name (1-63 of a-z, 0-9, "_", ".", "-", starting with a letter or digit)'))
          .max(10_000),
      })
      .strict(),
    /**
     * Cohort mode (docs/COHORT.md): records are committed through an etcd quorum and each
     * node keeps its own replica (`replicaPath`, default <dataDir>/cohort.db). Absent: the
     * single-node vault. Every node needs its own `nodeId`.
     */
    cohort: z
      .object({
        endpoints: z
          .array(z.string().regex(ETCD_ENDPOINT, 'must be http(s)://host:port (no user, path or query)'))
          .min(1, 'must list at least one etcd member')
          .max(15)
          .refine((e) => new Set(e).size === e.length, 'must not repeat an endpoint'),
        prefix: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}[A-Za-z0-9]$/, 'must be 2-64 of A-Z, a-z, 0-9, ".", "_", "/", "-", not ending in "/"'),
        nodeId: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$/, 'must be 1-32 of A-Z, a-z, 0-9, "_", ".", "-" (unique in the cohort)'),
        replicaPath: z.string().min(1).optional(),
        startTimeoutSec: z.number().int().min(1).max(300),
        /**
         * TLS to etcd (https:// endpoints): etcd's client CA, pinned (never the system roots),
         * and this node's client certificate and key when etcd demands one
         * (--client-cert-auth): how etcd is kept to the vault nodes (THREAT-MODEL R19).
         */
        tls: z
          .object({ caFile: z.string().min(1), certFile: z.string().min(1).optional(), keyFile: z.string().min(1).optional() })
          .strict()
          .refine((t) => !t.certFile === !t.keyFile, 'certFile and keyFile go together')
          .optional(),
      })
      .strict()
      .refine((c) => !c.endpoints.some((e) => e.startsWith('https:')) || !!c.tls, { message: 'https:// endpoints need cohort.tls.caFile (etcd\'s client CA)', path: ['tls'] })
      .refine((c) => !c.tls || c.endpoints.every((e) => e.startsWith('https:')), { message: 'cohort.tls needs https:// endpoints', path: ['tls'] })
      .optional(),
  })
  .strict();

export type Config = z.output<typeof Schema>;

export const DEFAULTS: Config = {
  dataDir: './data',
  listen: { host: '127.0.0.1', port: 8787 },
  hsm: { tokenLabel: 'bkv-embedded', workers: 'auto', controlThread: true },
  store: { checkpointWorker: true },
  vault: { attemptLimit: 10, sessionTtlSec: 120, kdfFloor: { m: 19456, t: 2, p: 1 } },
  limits: {
    tenantPerSec: 2000,
    tenantBurst: 4000,
    userPerMin: 60,
    userBurst: 20,
    maxPayloadBytes: 64 * 1024,
    maxInFlight: 64,
    idleSec: 300,
    tokenMaxLifetimeSec: 86_400,
    maxSessions: 100_000,
    tenantSessions: 20_000,
    tenantEnrollments: 5_000,
    maxChannels: 100_000,
    tenantChannels: 20_000,
    tenantClosedChannels: 200_000,
    tenantConnections: 1_000,
    userBucketsPerTenant: 50_000,
  },
  log: { level: 'info' },
  admin: { host: '127.0.0.1', port: 8788 },
  audit: { checkpointEvery: 1000, checkpointSec: 300 },
  tenants: { grants: {}, isolate: [] },
};

export type Json = { [k: string]: unknown };

function merge(base: Json, over: Json): Json {
  const out: Json = { ...base };
  for (const [k, v] of Object.entries(over)) {
    if (v === undefined) continue;
    const b = out[k];
    out[k] = v && typeof v === 'object' && !Array.isArray(v) && b && typeof b === 'object' ? merge(b as Json, v as Json) : v;
  }
  return out;
}

const bool = (v: string | undefined, name: string): boolean | undefined => {
  if (v === undefined || v === '') return undefined;
  if (v === '1' || v === 'true') return true;
  if (v === '0' || v === 'false') return false;
  throw new VaultError(ErrorCodes.BAD_REQUEST, `config: ${name} must be 1 or 0`);
};

/** BKV_HSM_WORKERS: off/0/false, auto/on/true, or a thread count (the schema checks its range). */
const workersOf = (v: string | undefined): 'off' | 'auto' | number | undefined => {
  const m = v?.trim().toLowerCase();
  if (!m) return undefined;
  if (m === 'off' || m === '0' || m === 'false') return 'off';
  if (m === 'auto' || m === 'on' || m === 'true') return 'auto';
  const n = Number(m);
  if (!Number.isInteger(n)) throw new VaultError(ErrorCodes.BAD_REQUEST, 'config: BKV_HSM_WORKERS must be off, auto or a thread count 1..256');
  return n;
};

const num = (v: string | undefined, name: string): number | undefined => {
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new VaultError(ErrorCodes.BAD_REQUEST, `config: ${name} must be a number`);
  return n;
};

export function parseListen(s: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(s);
  if (!m) throw new VaultError(ErrorCodes.BAD_REQUEST, `config: listen must be HOST:PORT (got a value of ${s.length} chars)`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

function fromEnv(env: NodeJS.ProcessEnv): Json {
  return {
    dataDir: env.BKV_DATA,
    listen: env.BKV_LISTEN ? parseListen(env.BKV_LISTEN) : undefined,
    tls: env.BKV_TLS_CERT || env.BKV_TLS_KEY ? { certFile: env.BKV_TLS_CERT, keyFile: env.BKV_TLS_KEY } : undefined,
    hsm: {
      module: env.BKV_HSM_MODULE,
      tokenLabel: env.BKV_HSM_TOKEN,
      pinFile: env.BKV_HSM_PIN_FILE,
      soPinFile: env.BKV_HSM_SO_PIN_FILE,
      libraryParameters: env.BKV_HSM_LIBRARY_PARAMETERS || undefined,
      acceptWrappableKeys: bool(env.BKV_HSM_ACCEPT_WRAPPABLE_KEYS, 'BKV_HSM_ACCEPT_WRAPPABLE_KEYS'),
      workers: workersOf(env.BKV_HSM_WORKERS),
      queue: num(env.BKV_HSM_QUEUE, 'BKV_HSM_QUEUE'),
      recycleAfter: num(env.BKV_HSM_RECYCLE, 'BKV_HSM_RECYCLE'),
      controlThread: bool(env.BKV_HSM_CONTROL, 'BKV_HSM_CONTROL'),
    },
    store: { checkpointWorker: bool(env.BKV_CHECKPOINT_WORKER, 'BKV_CHECKPOINT_WORKER') },
    dbPath: env.BKV_DB,
    vault: { attemptLimit: num(env.BKV_ATTEMPT_LIMIT, 'BKV_ATTEMPT_LIMIT') },
    log: { level: env.BKV_LOG_LEVEL },
    admin: env.BKV_ADMIN_LISTEN ? parseListen(env.BKV_ADMIN_LISTEN) : undefined,
    audit: { file: env.BKV_AUDIT_FILE },
    cohort:
      env.BKV_COHORT_ENDPOINTS || env.BKV_COHORT_NODE_ID || env.BKV_COHORT_PREFIX || env.BKV_COHORT_TLS_CA
        ? {
            endpoints: env.BKV_COHORT_ENDPOINTS ? env.BKV_COHORT_ENDPOINTS.split(',').map((e) => e.trim()) : undefined,
            nodeId: env.BKV_COHORT_NODE_ID,
            prefix: env.BKV_COHORT_PREFIX,
            tls: env.BKV_COHORT_TLS_CA ? { caFile: env.BKV_COHORT_TLS_CA, certFile: env.BKV_COHORT_TLS_CERT, keyFile: env.BKV_COHORT_TLS_KEY } : undefined,
          }
        : undefined,
  };
}

/** Load and validate. Every problem is reported with its field path, all at once. */
export function loadConfig(opts: { file?: string; env?: NodeJS.ProcessEnv; overrides?: Json } = {}): Config {
  const env = opts.env ?? process.env;
  let fileJson: Json = {};
  const file = opts.file ?? env.BKV_CONFIG;
  if (file) {
    if (!existsSync(file)) throw new VaultError(ErrorCodes.BAD_REQUEST, `config file ${file} does not exist`);
    const yaml = /\.ya?ml$/i.test(file);
    try {
      const text = readFileSync(file, 'utf8');
      fileJson = (yaml ? parseYaml(text) : JSON.parse(text)) as Json;
    } catch (e) {
      throw new VaultError(ErrorCodes.BAD_REQUEST, `config file ${file} is not valid ${yaml ? 'YAML' : 'JSON'}: ${(e as Error).message}`);
    }
    if (!fileJson || typeof fileJson !== 'object' || Array.isArray(fileJson)) {
      throw new VaultError(ErrorCodes.BAD_REQUEST, `config file ${file} must hold a ${yaml ? 'YAML mapping' : 'JSON object'}`);
    }
  }
  const merged = merge(merge(merge(DEFAULTS as unknown as Json, fileJson), fromEnv(env)), opts.overrides ?? {});
  // A cohort block gets its defaults only when one is given: no cohort means single node.
  if (merged.cohort && typeof merged.cohort === 'object' && !Array.isArray(merged.cohort)) {
    merged.cohort = merge({ prefix: 'bkv/v1', startTimeoutSec: 10 }, merged.cohort as Json);
  }
  const r = Schema.safeParse(merged);
  if (!r.success) {
    const lines = r.error.issues.map((i) => `  ${i.path.join('.') || '(root)'}: ${i.message}`);
    throw new VaultError(ErrorCodes.BAD_REQUEST, `invalid configuration:\n${lines.join('\n')}`);
  }
  const c = r.data;
  return { ...c, dataDir: resolve(c.dataDir) };
}

export interface HsmSettings {
  modulePath: string;
  tokenLabel: string;
  pinFile: string;
  /** The Security Officer's PIN file (hsm.soPinFile; embedded: <data>/hsm-so-pin), if any. */
  soPinFile?: string;
  /** C_Initialize library parameters (hsm.libraryParameters). */
  libraryParameters?: string;
  /** The operator accepts keys the module lets out wrapped (hsm.acceptWrappableKeys). */
  acceptWrappableKeys: boolean;
  /** Set when the vault runs its own SoftHSM2 token under dataDir. */
  embedded?: { conf: string; tokenDir: string; soPinFile: string };
}

export function hsmSettings(c: Config): HsmSettings {
  if (c.hsm.module) {
    if (!c.hsm.pinFile && !process.env.BKV_HSM_PIN) {
      throw new VaultError(ErrorCodes.BAD_REQUEST, 'config: hsm.pinFile (or BKV_HSM_PIN) is required with an external hsm.module');
    }
    return {
      modulePath: c.hsm.module,
      tokenLabel: c.hsm.tokenLabel,
      pinFile: c.hsm.pinFile ?? '',
      ...(c.hsm.soPinFile ? { soPinFile: c.hsm.soPinFile } : {}),
      ...(c.hsm.libraryParameters ? { libraryParameters: c.hsm.libraryParameters } : {}),
      acceptWrappableKeys: c.hsm.acceptWrappableKeys ?? false,
    };
  }
  const modulePath = SOFTHSM_CANDIDATES.find((p) => existsSync(p));
  if (!modulePath) {
    throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'embedded mode needs SoftHSM2 (apt-get install softhsm2) or set hsm.module');
  }
  return {
    modulePath,
    tokenLabel: c.hsm.tokenLabel,
    pinFile: c.hsm.pinFile ?? join(c.dataDir, 'hsm-pin'),
    soPinFile: c.hsm.soPinFile ?? join(c.dataDir, 'hsm-so-pin'),
    ...(c.hsm.libraryParameters ? { libraryParameters: c.hsm.libraryParameters } : {}),
    acceptWrappableKeys: c.hsm.acceptWrappableKeys ?? false,
    embedded: { conf: join(c.dataDir, 'softhsm2.conf'), tokenDir: join(c.dataDir, 'tokens'), soPinFile: join(c.dataDir, 'hsm-so-pin') },
  };
}

/** The PIN from BKV_HSM_PIN or the PIN file; never from argv. */
export function readPin(s: HsmSettings): string {
  const fromEnv = process.env.BKV_HSM_PIN;
  if (fromEnv) return fromEnv;
  if (!existsSync(s.pinFile)) throw new VaultError(ErrorCodes.BAD_REQUEST, `HSM PIN file ${s.pinFile} does not exist; run init first`);
  return readFileSync(s.pinFile, 'utf8').trim();
}

/**
 * The Security Officer PIN, for the key ceremony's trust step: BKV_HSM_SO_PIN or
 * the SO PIN file (hsm.soPinFile, BKV_HSM_SO_PIN_FILE; the embedded token keeps
 * it in <data>/hsm-so-pin). Never from argv. Missing: CEREMONY_SO_PIN_MISSING.
 */
export function readSoPin(s: HsmSettings): string {
  const fromEnv = process.env.BKV_HSM_SO_PIN;
  if (fromEnv) return fromEnv;
  if (!s.soPinFile || !existsSync(s.soPinFile)) {
    throw new VaultError(
      ErrorCodes.CEREMONY_SO_PIN_MISSING,
      `this step needs the HSM Security Officer PIN: ${s.soPinFile ? `${s.soPinFile} does not exist; ` : ''}set hsm.soPinFile (or BKV_HSM_SO_PIN_FILE), or BKV_HSM_SO_PIN for this command only`,
    );
  }
  const pin = readFileSync(s.soPinFile, 'utf8').trim();
  if (!pin) throw new VaultError(ErrorCodes.CEREMONY_SO_PIN_MISSING, `the Security Officer PIN file ${s.soPinFile} is empty`);
  return pin;
}
