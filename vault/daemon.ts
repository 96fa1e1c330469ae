// Assembles a serving vault: HSM keys, store, core, channels, auth, limits and
// the WebSocket server, plus metrics, the audit log and the admin listener,
// and tears them down in the reverse order on a signal.
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { hsmWorkerSettings, openServingKeys, selfTest } from './core/open.js';
import { Vault } from './core/vault.js';
import { Store } from './store/index.js';
import type { TenantDirectory } from './store/tenants.js';
import type { NamespacePolicy } from './core/namespace.js';
import { ChannelTable } from './rpc/channels.js';
import { Authenticator, mintToken } from './rpc/auth.js';
import { addTenant, mintTenantToken, revokeTenant, type TenantDeps } from './app/tenants.js';
import { rotate } from './app/rotate.js';
import { RateLimiter } from './rpc/ratelimit.js';
import { VERSION, methodTable } from './rpc/methods.js';
import { startServer, type RunningServer, type RequestEvent } from './rpc/server.js';
import { tokenConfig } from './setup.js';
import type { Config } from './config.js';
import type { VaultKeys } from './hsm/vault-keys.js';
import { VaultError, ErrorCodes } from '../protocol/errors.js';
import { toHex } from '../protocol/bytes.js';
import { instrumentKeys, Metrics } from './metrics.js';
import { AuditLog } from './audit/log.js';
import { cachedReadiness, readiness, readinessSignals, type Readiness } from './admin/health.js';
import { daemonStatus } from './admin/status.js';
import { isLoopback, startAdminServer, type AdminActions, type RunningAdmin } from './admin/server.js';
import { writeFileAtomic } from '../lib/safe-file.js';
import { dataPermissions } from './admin/perms.js';
import { cohortCeremony, exportInDaemon } from './ceremony/steps.js';
import type { CohortNode } from './cohort/node.js';
import type { Ledger } from './core/ledger.js';
import { hsmSettings } from './config.js';
import { inspectModule, rememberQuirks, requireCapabilities, requireUnwrappable, type CapabilityReport } from './hsm/capabilities.js';

export interface DaemonHooks {
  onRequest?: (e: RequestEvent) => void;
  metrics?: Metrics;
  /** Gets the HSM signer once the vault is open; closed (with a final checkpoint) by stop(). */
  audit?: AuditLog;
  /** Fault-injection seam for tests: wraps the HSM key interface before instrumentation. */
  wrapKeys?: (k: VaultKeys) => VaultKeys;
}

export interface Daemon {
  vault: Vault;
  server: RunningServer;
  auth: Authenticator;
  metrics: Metrics;
  audit: AuditLog | undefined;
  /** Set in cohort mode (config `cohort`): the replication engine this node serves through. */
  cohort: CohortNode | undefined;
  /** Who may call: vault.db's table on a single node, etcd's (through the cohort engine) on a cohort node. */
  tenants: TenantDirectory;
  /**
   * Cohort mode: per tenant, the closing of its connections that its last applied
   * revocation started on this node (resolves with how many were open).
   */
  revocations: Map<string, Promise<number>>;
  startedAt: number;
  /** The start-up capability check (bkv-admin hsm check / status show it). */
  hsmCheck: CapabilityReport;
  readiness(): Promise<Readiness>;
  stop(): Promise<void>;
}

/**
 * Which malloc this process runs on. With glibc's, RSS saws up through each HSM library
 * recycle and settles higher; jemalloc (the image and ./scripts/start preload it) keeps it
 * flat (docs/OPERATIONS.md, docs/PERFORMANCE.md).
 */
function malloc(): 'jemalloc' | 'libc' {
  try {
    return readFileSync('/proc/self/maps', 'utf8').includes('libjemalloc') ? 'jemalloc' : 'libc';
  } catch {
    return 'libc';
  }
}

/**
 * The capability check every start runs (vault/hsm/capabilities.ts): refuses a
 * module that lacks what the vault needs, and keys it lets out wrapped unless the
 * operator accepted that; learns the module's quirks for the key workers.
 */
export function startupCheck(c: Config, log: Logger, metrics?: Metrics): CapabilityReport {
  const cfg = tokenConfig(c);
  const accepted = hsmSettings(c).acceptWrappableKeys;
  const check = inspectModule(cfg, { vaultKeys: true });
  metrics?.hsmKeysWrappable.set(check.wrap.wrappable ? 1 : 0);
  metrics?.hsmWrappableAccepted.set(check.wrap.wrappable && accepted ? 1 : 0);
  requireCapabilities(check, 'start refused');
  requireUnwrappable(check, accepted, 'start refused');
  rememberQuirks(cfg, check.quirks);
  log.info({ event: 'hsm.capabilities', quirks: check.quirks, wrappable: check.wrap.wrappable, library: check.module.library }, 'HSM capability check passed');
  if (check.wrap.wrappable) {
    log.warn(
      { event: 'hsm.keys.wrappable', accepted: true, keys: [...check.wrap.vaultKeys, ...check.wrap.throwaway].filter((w) => w.wrapped).map((w) => w.key) },
      'the HSM lets never-extractable keys out wrapped; serving only because hsm.acceptWrappableKeys is set',
    );
  }
  return check;
}

async function openServingVault(
  c: Config,
  log: Logger,
  metrics: Metrics,
  wrap?: (k: VaultKeys) => VaultKeys,
): Promise<{ vault: Vault; check: CapabilityReport; cohort: CohortNode | undefined }> {
  // HSM worker threads unless hsm.workers is "off" (docs/PERFORMANCE.md).
  const checkpointWorker = c.store.checkpointWorker;
  const check = startupCheck(c, log, metrics);
  const raw = await openServingKeys({ ...tokenConfig(c), quirks: check.quirks }, log, hsmWorkerSettings(c.hsm));
  let store: Store | undefined;
  let cohort: CohortNode | undefined;
  try {
    const keys = instrumentKeys(wrap ? wrap(raw) : raw, metrics);
    await selfTest(keys);
    // WAL checkpoints off the event loop; a failure here only moves them back onto it.
    const onFailure = (code: string) => log.warn({ event: 'store.checkpoint.failed', code }, 'WAL checkpoint off the event loop failed');
    store = new Store(c.dbPath ?? join(c.dataDir, 'vault.db'), checkpointWorker ? { checkpointWorker: { onFailure } } : {});
    // Cohort mode: records come from (and go through) etcd; no quorum at start is an error, never a fallback.
    const cc = c.cohort;
    const joinCohort = cc
      ? async (ledger: Ledger) => {
          // Loaded only here: the etcd client (etcd3, gRPC) costs ~0.2 s of every start, and
          // most vaults run alone.
          const [{ CohortNode }, { CohortKeyring }] = await Promise.all([import('./cohort/node.js'), import('./cohort/keyring.js')]);
          cohort = await CohortNode.start(
            {
              endpoints: cc.endpoints,
              prefix: cc.prefix,
              nodeId: cc.nodeId,
              replicaPath: cc.replicaPath ?? join(c.dataDir, 'cohort.db'),
              startTimeoutMs: cc.startTimeoutSec * 1000,
              ...(cc.tls
                ? {
                    tls: {
                      ca: readConfigFile(cc.tls.caFile, 'cohort.tls.caFile'),
                      ...(cc.tls.certFile && cc.tls.keyFile
                        ? { cert: readConfigFile(cc.tls.certFile, 'cohort.tls.certFile'), key: readConfigFile(cc.tls.keyFile, 'cohort.tls.keyFile') }
                        : {}),
                    },
                  }
                : {}),
              onCommit: (s) => metrics.cohortCommitSeconds.observe(s),
              localTenants: store!.tenants.list(),
            },
            log,
            ledger,
          );
          // Before serving: hold the cohort's seal epoch (a node down through a rotation catches up here).
          cohort.keyring = new CohortKeyring({ ledger: cohort.ledger, replica: cohort.replica, nodeId: cc.nodeId, keys, ceremony: cohortCeremony(tokenConfig(c), log), log });
          await cohort.keyring.join();
          cohort.keyring.start();
          return cohort.records;
        }
      : undefined;
    const vault = await Vault.open(keys, store, log, {
      attemptLimit: c.vault.attemptLimit,
      sessionTtlMs: c.vault.sessionTtlSec * 1000,
      kdfFloor: { alg: 'argon2id', ...c.vault.kdfFloor },
      maxSessions: c.limits.maxSessions,
      tenantSessions: c.limits.tenantSessions,
      tenantEnrollments: c.limits.tenantEnrollments,
    }, joinCohort);
    if (cohort?.keyring) vault.useCohortKeys(cohort.keyring);
    return { vault, check, cohort };
  } catch (e) {
    await cohort?.close();
    store?.close();
    await raw.close();
    throw e;
  }
}

/** A file the config names (certificates, keys): BAD_REQUEST naming the field when it cannot be read. */
function readConfigFile(file: string, field: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `config: ${field}: cannot read ${file} (${(e as NodeJS.ErrnoException).code ?? 'error'})`);
  }
}

export async function startDaemon(c: Config, log: Logger, hooks: DaemonHooks = {}): Promise<Daemon> {
  const metrics = hooks.metrics ?? new Metrics({ processMetrics: false });
  const { vault, check, cohort } = await openServingVault(c, log, metrics, hooks.wrapKeys);
  const now = vault.options.now;
  const tenants: TenantDirectory = cohort ? cohort.tenants : vault.store.tenants;
  const channels = new ChannelTable(vault, {
    ttlMs: c.vault.sessionTtlSec * 1000,
    freshnessMs: 60_000,
    maxChannels: c.limits.maxChannels,
    tenantChannels: c.limits.tenantChannels,
    tenantEnrollChannels: c.limits.tenantEnrollments,
    tenantClosedChannels: c.limits.tenantClosedChannels,
    now,
    onInternalError: (e) => log.error({ event: 'channel.internal', err: (e as Error)?.message }, 'internal error'),
  });
  const auth = new Authenticator({
    vaultId: vault.vaultId,
    isActive: (n, v) => tenants.isActive(n, v),
    deriveSecret: (input) => vault.keys.tenantSecret(input),
    now,
    maxLifetimeSec: c.limits.tokenMaxLifetimeSec,
  });
  const limiter = new RateLimiter(
    {
      tenant: { perSec: c.limits.tenantPerSec, burst: c.limits.tenantBurst },
      user: { perSec: c.limits.userPerMin / 60, burst: c.limits.userBurst },
    },
    now,
    { userBucketsPerTenant: c.limits.userBucketsPerTenant },
  );
  let server: RunningServer;
  try {
    server = await startServer(
      {
        auth,
        limiter,
        methods: metrics.wrapMethods(methodTable(vault, channels, namespacePolicy(c, tenants))),
        log,
        now,
        onRequest: (e) => {
          metrics.observeRequest(e);
          hooks.onRequest?.(e);
        },
      },
      {
        host: c.listen.host,
        port: c.listen.port,
        ...(c.tls ? { tls: { cert: readFileSync(c.tls.certFile), key: readFileSync(c.tls.keyFile) } } : {}),
        maxPayload: c.limits.maxPayloadBytes,
        maxInFlight: c.limits.maxInFlight,
        tenantConnections: c.limits.tenantConnections,
        idleMs: c.limits.idleSec * 1000,
        drainMs: 10_000,
      },
    );
  } catch (e) {
    await cohort?.close();
    vault.store.close();
    await vault.keys.close();
    throw e;
  }
  // Cohort: a revocation applied on this node, whichever node made it, cuts the tenant's
  // open connections off here too (issue 14 finding 3, cohort-wide): every further request
  // is refused from now on, and the sockets close with 4401.
  const revocations = new Map<string, Promise<number>>();
  cohort?.tenants.onRevoked((name, versions) => {
    auth.revoked(name, versions);
    const closing = server.revoke(name, versions);
    revocations.set(name, closing);
    void closing.then((connectionsClosed) =>
      log.info({ event: 'tenant.revoke.applied', tenant: name, versions, connectionsClosed }, 'tenant revocation applied on this node'),
    );
  });
  metrics.attach({
    records: () => vault.store.records.counts(),
    ledger: () => vault.ledger.status(),
    epoch: () => vault.keys.currentEpoch(),
    connections: () => server.connections(),
    cohort: () => {
      if (!cohort) return undefined;
      const st = cohort.ledger.status();
      return {
        node: st.nodeId,
        applied: Number(st.appliedRevision),
        lag: Number(st.lag),
        txns: st.stats.txns,
        compareFailed: st.stats.compareFailed,
        commits: st.stats.commits,
      };
    },
    tables: () => {
      const s = vault.sessionStats();
      const ch = channels.stats();
      return { sessions: s.held, enrolments: s.enroll, channels: ch.live, closed_channel_ids: ch.spent, rate_buckets: limiter.size() };
    },
  });
  const audit = hooks.audit;
  audit?.attachSigner({ vaultId: vault.vaultId, sign: (digest) => vault.keys.sign(digest) });
  vault.startSweeper();
  const sweep = setInterval(() => channels.sweep(), 1000);
  sweep.unref();
  const startedAt = Date.now();
  log.info(
    {
      event: 'vault.start',
      vaultId: toHex(vault.vaultId),
      epoch: vault.keys.currentEpoch(),
      anchorSeq: vault.ledger.status().anchored,
      ...(cohort ? { cohortNode: cohort.settings.nodeId, cohortRevision: cohort.replica.appliedRevision.toString() } : {}),
      pid: process.pid,
      version: VERSION,
      malloc: malloc(),
      checkpointWorker: !!vault.store.records.checkpoints(),
    },
    'vault open',
  );
  const perms = dataPermissions(c.dataDir);
  if (!perms.ok) {
    log.warn({ event: 'data.permissions', problems: perms.problems }, 'the data folder is readable or writable by others: folders should be 0700, files 0600 (bkv-admin status lists them)');
  }
  log.info(
    { event: 'listening', host: c.listen.host, port: server.port, tls: !!c.tls, vaultId: toHex(vault.vaultId) },
    `vault listening on ${c.tls ? 'wss' : 'ws'}://${c.listen.host}:${server.port}`,
  );
  let stopped: Promise<void> | undefined;
  return {
    vault,
    server,
    auth,
    metrics,
    audit,
    cohort,
    tenants,
    revocations,
    startedAt,
    hsmCheck: check,
    readiness: cachedReadiness(
      () => readiness(vault, audit, { ...(cohort ? { cohort } : {}) }),
      async () => (await readinessSignals(vault, audit)) + (cohort ? `|${cohort.ledger.stopped?.message ?? ''}` : ''),
      { onEvaluate: () => metrics.readyEvaluations.inc() },
    ),
    stop: () =>
      (stopped ??= (async () => {
        await server.close();
        clearInterval(sweep);
        vault.close();
        await cohort?.close();
        log.info({ event: 'stopped' }, 'vault stopped');
        // Last: the final audit checkpoint still needs the HSM.
        await audit?.close();
        vault.store.close();
        await vault.keys.close();
      })()),
  };
}

/**
 * Where each tenant's requests may act (core/namespace.ts): its home from the tenants table
 * (its own name, or "_legacy" for tenants from before namespaces) unless `tenants.isolate`
 * names it (then its own name), and the namespaces `tenants.grants` names for it. A config
 * edit needs a restart. A home never changes once the tenant exists (new versions inherit
 * it), so it is read once per tenant, not per request; only authenticated tenants reach
 * this, so the map is bounded by the tenants table.
 */
export function namespacePolicy(c: Config, tenants: Pick<TenantDirectory, 'home'>): NamespacePolicy {
  const grants = new Map(Object.entries(c.tenants.grants));
  const isolated = new Set(c.tenants.isolate);
  const homes = new Map<string, string>();
  return {
    home(t) {
      let h = homes.get(t);
      if (h === undefined) homes.set(t, (h = isolated.has(t) ? t : tenants.home(t)));
      return h;
    },
    granted: (t) => grants.get(t) ?? [],
  };
}

/** The development tenant (`--dev`): created once, and a fresh 24 h token written to the data folder. */
export async function devToken(d: Daemon, c: Config, log: Logger): Promise<string> {
  const tenants = d.tenants;
  let dev = tenants.list().find((t) => t.name === 'dev' && t.state === 'active');
  if (!dev) {
    await tenants.add('dev', Date.now());
    dev = tenants.list().find((t) => t.name === 'dev' && t.state === 'active')!;
    log.info({ event: 'tenant.add', tenant: 'dev', version: dev.version }, 'development tenant created');
  }
  const secret = await d.auth.secretFor('dev', dev.version);
  const token = mintToken(secret, { tenant: 'dev', version: dev.version, vaultId: d.vault.vaultId, ttlSec: 86_400 });
  writeFileAtomic(join(c.dataDir, 'dev-token'), token + '\n');
  return token;
}

/** Files through which bkv-admin finds and authenticates to a running daemon. */
export const adminFiles = (dataDir: string) => ({ info: join(dataDir, 'admin.json'), token: join(dataDir, 'admin-token') });

/** What the admin endpoints do, on the daemon's own vault (it owns the HSM token). */
export function adminActions(d: Daemon, c: Config, log: Logger): AdminActions {
  const { vault, auth } = d;
  const { tenants } = d;
  const deps: TenantDeps = {
    tenants,
    secretFor: (name, version) => auth.secretFor(name, version),
    vaultId: vault.vaultId,
    tokenMaxLifetimeSec: c.limits.tokenMaxLifetimeSec,
    log,
  };
  return {
    status: () =>
      daemonStatus(c, vault, {
        ...(d.audit ? { audit: d.audit } : {}),
        ...(d.cohort ? { cohort: d.cohort.report() } : {}),
        tenants,
        startedAt: d.startedAt,
        connections: () => d.server.connections(),
        hsmCheck: d.hsmCheck,
      }),
    rotate: (o, onProgress) => rotate(vault, o, onProgress, !!d.cohort),
    tenants: () => ({ tenants: tenants.list() }),
    addTenant: (name) => addTenant(deps, name),
    async revokeTenant(name, version) {
      const r = await revokeTenant(deps, name, version, async (versions) => {
        if (d.cohort) {
          // Applied here before revoke() resolved: the listener in startDaemon has already cut
          // them off (and every other node does on applying it).
          return (await d.revocations.get(name)) ?? 0;
        }
        // "Tokens stop working at once": open connections too, not only new upgrades
        // (issue 14, finding 3). Every further request of theirs is refused from here on.
        auth.revoked(name, versions);
        return d.server.revoke(name, versions);
      });
      return { name: r.name, revoked: r.revoked, connectionsClosed: r.connectionsClosed };
    },
    mintTenantToken: (name, ttlSec, sub) => mintTenantToken(deps, name, ttlSec, sub),
    async checkpoint() {
      const checkpointed = (await d.audit?.checkpoint()) ?? false;
      const s = d.audit?.status();
      return { checkpointed, seq: s?.seq ?? 0, signedThrough: s?.signedThrough ?? 0 };
    },
    async ceremonyExport(target, epoch) {
      try {
        return exportInDaemon(tokenConfig(c), target, epoch, log);
      } catch (e) {
        if (e instanceof VaultError) log.info({ event: 'ceremony.refused', step: 'export', code: e.code }, 'ceremony export refused');
        throw e;
      }
    },
  };
}

/**
 * Start the admin listener for a running daemon and publish how bkv-admin
 * reaches it: <data>/admin.json (address, pid) and <data>/admin-token (a
 * fresh random bearer, mode 0600). Both are removed again by close().
 */
export async function startAdmin(d: Daemon, c: Config, log: Logger): Promise<RunningAdmin> {
  const adminToken = randomBytes(32).toString('hex');
  const admin = await startAdminServer(
    { metrics: d.metrics, readiness: () => d.readiness(), actions: adminActions(d, c, log), adminToken, log },
    { host: c.admin.host, port: c.admin.port },
  );
  const files = adminFiles(c.dataDir);
  const host = isLoopback(c.admin.host) ? c.admin.host : c.admin.host === '0.0.0.0' ? '127.0.0.1' : c.admin.host === '::' ? '::1' : c.admin.host;
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${admin.port}`;
  // Replaced whole (temp file, rename), never written through a link planted at the name (safe-file.ts).
  writeFileAtomic(files.token, adminToken + '\n');
  writeFileAtomic(files.info, JSON.stringify({ url, pid: process.pid, startedAt: new Date(d.startedAt).toISOString() }) + '\n');
  log.info({ event: 'admin.listening', host: c.admin.host, port: admin.port }, `admin listener on ${url} (/healthz /readyz /metrics)`);
  return {
    ...admin,
    async close() {
      await admin.close();
      try {
        // Only our own: a newer daemon may already have replaced them.
        if (readFileSync(files.token, 'utf8').trim() === adminToken) {
          rmSync(files.info, { force: true });
          rmSync(files.token, { force: true });
        }
      } catch {
        /* already gone */
      }
    },
  };
}
