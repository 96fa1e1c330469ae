// A real etcd cluster for tests and scripts: `etcd` processes (Debian's
// etcd-server, installed by scripts/setup) on free loopback ports in a temp
// folder, each member's output in a log file beside its data dir.
//
// The harness talks to etcd over its HTTP endpoints (/health and the JSON
// gateway for maintenance status and membership), not through the etcd3 npm
// client: the client is what the tests exercise, and the harness must keep
// working while it misbehaves. It also leaves no gRPC channel reconnecting
// in the test process after stop().
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';

export const ETCD_BIN = process.env.BKV_ETCD_BIN ?? 'etcd';

export interface EtcdMember {
  name: string;
  /** PID of the running process, or of the last one if it is not running. */
  pid: number;
  clientUrl: string;
  peerUrl: string;
  dataDir: string;
  /** The member's stdout and stderr (zap JSON lines), appended across restarts. */
  logFile: string;
}

export interface MemberStatus {
  /** Member id as a decimal string (uint64). */
  id: string;
  clusterId: string;
  /** Member id of the leader this member follows, '0' when it has none. */
  leader: string;
  raftTerm: string;
  revision: string;
  dbSize: number;
}

export interface EtcdCluster {
  dir: string;
  token: string;
  /** Client URLs, one per member, in member order. */
  endpoints: string[];
  members: EtcdMember[];
  /** Index of the member that leads, by the maintenance status API of the running members. */
  leader(timeoutMs?: number): Promise<number>;
  /** Maintenance status of member i (it must be running). */
  status(i: number): Promise<MemberStatus>;
  running(i: number): boolean;
  /** Signal member i and wait for it to exit. */
  kill(i: number, signal?: NodeJS.Signals): Promise<void>;
  /** Start member i again with the command it last ran with; wait until it is healthy. */
  restart(i: number): Promise<void>;
  /** Kill member i and delete its data dir. Bring it back with rejoin(i). */
  wipe(i: number): Promise<void>;
  /**
   * Re-add a wiped member: remove its old identity through the cluster API,
   * add it again under the same peer URL, start it with
   * --initial-cluster-state existing, and wait until it is healthy.
   */
  rejoin(i: number): Promise<void>;
  /** SIGTERM every member, SIGKILL what is left after a grace period, wait for exits, delete the folder. */
  stop(): Promise<void>;
}

export interface StartEtcdOptions {
  members?: number;
  /** Parent folder for the cluster's temp folder (default: the OS temp dir). */
  dir?: string;
  token?: string;
  /**
   * Raft timings in ms; default 50/500 (etcd's own: 100/1000). Measured on
   * this 2-core machine at load average ~17 (bench/etcd-probe.ts): a new
   * leader in a median 0.58 s instead of 1.33 s after kill -9, and no
   * spurious election in 30 s of group commits with either. Loopback RTT is
   * microseconds; what could trip a 500 ms election timeout is a long fsync.
   * Pass 100/1000 to measure what production timings give.
   */
  heartbeatMs?: number;
  electionMs?: number;
  /** Extra etcd flags for every member, e.g. ['--quota-backend-bytes=...']. */
  extraArgs?: string[];
  /** Give up waiting for a healthy cluster after this long. */
  timeoutMs?: number;
  /**
   * Client and peer port of each member (2 per member), to recreate a cluster
   * at the same URLs (bench/etcd-probe.ts ids). Tests leave it out: fixed
   * ports clash with other test files and engineers.
   */
  ports?: number[];
}

// Every etcd this process started, so none outlives it (see the exit hooks
// below), and every cluster folder not yet removed (a few hundred MB each:
// etcd preallocates 64 MB WAL segments).
const live = new Map<number, ChildProcess>();
const dirs = new Set<string>();
let hooked = false;

function killAllNow(): void {
  for (const [pid] of live) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  live.clear();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  dirs.clear();
}

function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', killAllNow);
  // 'exit' does not run on a fatal signal: kill the members, then let the
  // signal do what it would have done had we not listened.
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const onSignal = () => {
      killAllNow();
      process.removeListener(sig, onSignal);
      if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
    };
    process.on(sig, onSignal);
  }
}

/** Free loopback ports, all held open at once so they are distinct, then released for etcd to bind. */
export async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: n }, () => new Promise<import('node:net').Server>((res, rej) => {
      const s = createServer();
      s.once('error', rej);
      s.listen(0, '127.0.0.1', () => res(s));
    })),
  );
  const ports = servers.map((s) => (s.address() as import('node:net').AddressInfo).port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function httpJson(url: string, body?: unknown, timeoutMs = 2_000): Promise<any> {
  const res = await fetch(url, {
    method: body === undefined ? 'GET' : 'POST',
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status} ${text.slice(0, 300)}`);
  return JSON.parse(text);
}

function tail(file: string, lines = 15): string {
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

class StartupPortClash extends Error {}

export async function startEtcdCluster(opts: StartEtcdOptions = {}): Promise<EtcdCluster> {
  // Ports are released before etcd binds them; another process may take one
  // in between. That shows as "address already in use": start over on new ports.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(opts);
    } catch (e) {
      if (!(e instanceof StartupPortClash) || opts.ports || attempt >= 4) throw e;
    }
  }
}

async function startOnce(opts: StartEtcdOptions): Promise<EtcdCluster> {
  hookExit();
  const n = opts.members ?? 3;
  if (!Number.isInteger(n) || n < 1) throw new Error(`members must be a positive integer (got ${n})`);
  const dir = mkdtempSync(join(opts.dir ?? tmpdir(), 'bkv-etcd-'));
  dirs.add(dir);
  const token = opts.token ?? `bkv-test-${randomBytes(6).toString('hex')}`;
  const timeoutMs = opts.timeoutMs ?? 30_000;
  if (opts.ports && opts.ports.length !== 2 * n) throw new Error(`ports must hold 2 per member (${2 * n})`);
  const ports = opts.ports ?? (await freePorts(2 * n));
  const members: EtcdMember[] = Array.from({ length: n }, (_, i) => ({
    name: `n${i + 1}`,
    pid: 0,
    clientUrl: `http://127.0.0.1:${ports[2 * i]}`,
    peerUrl: `http://127.0.0.1:${ports[2 * i + 1]}`,
    dataDir: join(dir, `n${i + 1}.etcd`),
    logFile: join(dir, `n${i + 1}.log`),
  }));
  const timing = [`--heartbeat-interval=${opts.heartbeatMs ?? 50}`, `--election-timeout=${opts.electionMs ?? 500}`];
  const argsFor = (m: EtcdMember, initialCluster: string, state: 'new' | 'existing') => [
    '--name', m.name,
    '--data-dir', m.dataDir,
    '--listen-client-urls', m.clientUrl,
    '--advertise-client-urls', m.clientUrl,
    '--listen-peer-urls', m.peerUrl,
    '--initial-advertise-peer-urls', m.peerUrl,
    '--initial-cluster', initialCluster,
    '--initial-cluster-token', token,
    '--initial-cluster-state', state,
    '--logger', 'zap',
    '--log-outputs', 'stderr',
    ...timing,
    ...(opts.extraArgs ?? []),
  ];
  const initialCluster = members.map((m) => `${m.name}=${m.peerUrl}`).join(',');
  // The command each member runs; a restart runs it again (etcd ignores
  // --initial-cluster-state new once the data dir exists), rejoin replaces it.
  const args = members.map((m) => argsFor(m, initialCluster, 'new'));
  const procs: (ChildProcess | undefined)[] = new Array(n);

  const launch = (i: number) => {
    const m = members[i]!;
    const fd = openSync(m.logFile, 'a');
    let child: ChildProcess;
    try {
      child = spawn(ETCD_BIN, args[i]!, { stdio: ['ignore', fd, fd] });
    } finally {
      closeSync(fd);
    }
    if (child.pid === undefined) throw new Error(`could not spawn ${ETCD_BIN} (is etcd-server installed? run scripts/setup)`);
    m.pid = child.pid;
    procs[i] = child;
    live.set(child.pid, child);
    child.once('exit', () => live.delete(child.pid!));
  };
  const running = (i: number) => {
    const p = procs[i];
    return !!p && p.exitCode === null && p.signalCode === null;
  };
  const exitOf = (p: ChildProcess) =>
    p.exitCode !== null || p.signalCode !== null ? Promise.resolve() : new Promise<void>((r) => p.once('exit', () => r()));

  const healthy = async (i: number) => {
    try {
      const h = await httpJson(`${members[i]!.clientUrl}/health`, undefined, 1_000);
      return h.health === 'true' || h.health === true;
    } catch {
      return false;
    }
  };
  const waitHealthy = async (idx: number[], what: string) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      for (const i of idx) {
        if (!running(i)) {
          const log = tail(members[i]!.logFile);
          if (log.includes('address already in use')) throw new StartupPortClash(log);
          throw new Error(`etcd ${members[i]!.name} exited while ${what} (code ${procs[i]?.exitCode}, signal ${procs[i]?.signalCode}):\n${log}`);
        }
      }
      const ok = await Promise.all(idx.map(healthy));
      if (ok.every(Boolean)) return;
      if (Date.now() > deadline) {
        const logs = idx.map((i) => `--- ${members[i]!.name} (${ok[idx.indexOf(i)] ? 'healthy' : 'not healthy'}):\n${tail(members[i]!.logFile)}`);
        throw new Error(`etcd cluster not healthy after ${timeoutMs} ms while ${what}\n${logs.join('\n')}`);
      }
      await sleep(100);
    }
  };

  const status = async (i: number): Promise<MemberStatus> => {
    const s = await httpJson(`${members[i]!.clientUrl}/v3/maintenance/status`, {}, 1_000);
    return {
      id: String(s.header.member_id),
      clusterId: String(s.header.cluster_id),
      leader: String(s.leader ?? '0'),
      raftTerm: String(s.raftTerm ?? s.header.raft_term),
      revision: String(s.header.revision ?? '0'),
      dbSize: Number(s.dbSize ?? 0),
    };
  };

  /** A running member that answers, to send cluster API calls through. */
  const anyHealthy = async (except: number) => {
    for (let i = 0; i < n; i++) if (i !== except && running(i) && (await healthy(i))) return i;
    throw new Error('no healthy etcd member to talk to');
  };

  const kill = async (i: number, signal: NodeJS.Signals = 'SIGKILL') => {
    const p = procs[i];
    if (!p || !running(i)) return;
    p.kill(signal);
    await exitOf(p);
  };

  const stopped = { done: false };
  const cluster: EtcdCluster = {
    dir,
    token,
    endpoints: members.map((m) => m.clientUrl),
    members,
    running,
    status,
    async leader(waitMs = 15_000) {
      const deadline = Date.now() + waitMs;
      for (;;) {
        // Agreement of the running members that answer, and the leader among them.
        const views = await Promise.all(
          members.map((_, i) => (running(i) ? status(i).catch(() => undefined) : Promise.resolve(undefined))),
        );
        const answered = views.filter((v): v is MemberStatus => !!v);
        const leaderId = answered[0]?.leader;
        if (leaderId && leaderId !== '0' && answered.every((v) => v.leader === leaderId)) {
          const idx = views.findIndex((v) => v?.id === leaderId);
          if (idx >= 0) return idx;
        }
        if (Date.now() > deadline) throw new Error(`no agreed etcd leader after ${waitMs} ms: ${JSON.stringify(answered)}`);
        await sleep(50);
      }
    },
    kill,
    async restart(i) {
      await kill(i, 'SIGKILL');
      launch(i);
      await waitHealthy([i], `restarting ${members[i]!.name}`);
    },
    async wipe(i) {
      await kill(i, 'SIGKILL');
      rmSync(members[i]!.dataDir, { recursive: true, force: true });
    },
    async rejoin(i) {
      const m = members[i]!;
      if (running(i)) throw new Error(`rejoin(${i}): ${m.name} is running; wipe it first`);
      if (existsSync(m.dataDir)) throw new Error(`rejoin(${i}): ${m.name} still has a data dir; wipe it first`);
      const via = members[await anyHealthy(i)]!.clientUrl;
      // strict-reconfig-check refuses changes while the answering member has
      // not been connected to a quorum for 5 s ("unhealthy cluster"), e.g.
      // right after a start or a restart: retry until the deadline.
      const reconfig = async (path: string, body: unknown) => {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
          try {
            return await httpJson(`${via}${path}`, body, 5_000);
          } catch (e) {
            if (Date.now() > deadline) throw e;
            await sleep(250);
          }
        }
      };
      const list = await reconfig('/v3/cluster/member/list', {});
      const old = (list.members as any[]).find((x) => (x.peerURLs ?? []).includes(m.peerUrl));
      if (old) await reconfig('/v3/cluster/member/remove', { ID: old.ID });
      const added = await reconfig('/v3/cluster/member/add', { peerURLs: [m.peerUrl] });
      const initial = (added.members as any[])
        .map((x) => `${x.name || m.name}=${(x.peerURLs as string[])[0]}`)
        .join(',');
      args[i] = argsFor(m, initial, 'existing');
      launch(i);
      await waitHealthy([i], `rejoining ${m.name}`);
    },
    async stop() {
      if (stopped.done) return;
      stopped.done = true;
      const alive = procs.filter((p, i): p is ChildProcess => !!p && running(i));
      for (const p of alive) p.kill('SIGTERM');
      // Followers exit within ~150 ms. The leader tries to hand over its
      // leadership first and, with every peer gone, waits out its request
      // timeout (7 s): SIGKILL it after a short grace. etcd fsyncs before it
      // acknowledges, so this loses nothing.
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all(alive.map(exitOf)), new Promise((r) => (timer = setTimeout(r, 1_500)))]);
      clearTimeout(timer);
      for (const p of alive) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
      await Promise.all(alive.map(exitOf));
      rmSync(dir, { recursive: true, force: true });
      dirs.delete(dir);
    },
  };

  try {
    for (let i = 0; i < n; i++) launch(i);
    await waitHealthy(members.map((_, i) => i), 'starting');
  } catch (e) {
    await cluster.stop();
    throw e;
  }
  return cluster;
}
