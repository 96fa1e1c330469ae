// Opt-in flood of unfinished enrolments against the real daemon (issue 14,
// findings 1 and 4; docs/SECURITY.md "flood"). Not part of the suite: what it
// reports depends on RSS and the clock.
//
//   npx tsx scripts/flood.ts [--n 200000] [--connections 8] [--window 48]
//
// One tenant ("dev") sends N enroll.begin handshakes on fresh channels, for N
// distinct user ids (so N rate-limit keys too), and never finishes them. Meanwhile
// a second tenant recovers its users in a loop. Prints the daemon's RSS before and
// after, the second tenant's recovery latency before and during the flood, the
// flood's answers by code, and checks that every user of both tenants still
// recovers with the right password and no attempt was lost. Exit 1 if not.
//
// Uses only configuration fields every version has, so the same run can be made
// against an older build for comparison. The flood runs in a child process (this
// script with --flood-worker), so its CPU does not delay the probe's answers.
// Handshakes are cheap to make: the i-th ephemeral key is e0 + i, so E and the
// shared point advance by one addition each.
import { spawn } from 'node:child_process';
import { p256 } from '@noble/curves/nist.js';
import { startDaemon, TEST_CONFIG } from '../test/helpers/daemon.js';
import { adminApi } from '../test/helpers/admin-api.js';
import { RawSocket, median, pinnedKeyOf, quantile, rssOf } from '../test/helpers/adversarial.js';
import { VaultClient } from '../client/sdk.js';
import { WebSocketTransport } from '../client/transport.js';
import { startOprf } from '../client/protocol.js';
import { channelKeys } from '../protocol/channel.js';
import { sealMessage } from '../vault/rpc/channel-node.js';
import { toB64 } from '../protocol/bytes.js';
import type { KdfParams } from '../protocol/kdf.js';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const N = arg('n', 200_000);
const CONNECTIONS = arg('connections', 8);
const WINDOW = arg('window', 48);
const KDF: KdfParams = { alg: 'argon2id', m: 64, t: 1, p: 1 };
const USERS = 5;

if (process.argv.includes('--flood-worker')) {
  const [url, token, channelKey, vaultId] = process.argv.slice(process.argv.indexOf('--flood-worker') + 1) as [string, string, string, string];
  console.log(JSON.stringify(await flood(url, token, Buffer.from(channelKey, 'hex'), Buffer.from(vaultId, 'hex'))));
  process.exit(0);
}

/** N enroll.begin handshakes over CONNECTIONS sockets, WINDOW in flight on each: the answers by code. */
async function flood(url: string, token: string, channelKey: Uint8Array, vaultId: Uint8Array): Promise<Record<string, number>> {
  const G = p256.Point.BASE;
  const KX = p256.Point.fromBytes(channelKey);
  const random = BigInt('0x' + Buffer.from(p256.utils.randomSecretKey()).toString('hex'));
  const e0 = BigInt(1) + (random % (p256.Point.Fn.ORDER - BigInt(2 * N + 10)));
  let E = G.multiply(e0);
  let Z = KX.multiply(e0);
  const blinded = toB64(startOprf(vaultId, 'flood', 'x').blinded);
  let next = 0;
  const handshake = async () => {
    const i = next++;
    E = E.add(G);
    Z = Z.add(KX);
    const epk = E.toBytes(false);
    const k = channelKeys(Z.toBytes(true).slice(1), epk, vaultId, channelKey);
    const userId = `flood-${i}`;
    const ts = Date.now();
    const ct = await sealMessage(k.c2s, { dir: 'c2s', channelId: k.id, counter: 0, method: 'enroll.begin', userId, ts }, { blinded });
    return { userId, channel: { id: toB64(k.id), epk: toB64(epk), n: 0, ts, ct: toB64(ct) } };
  };
  const byCode: Record<string, number> = {};
  await Promise.all(
    Array.from({ length: CONNECTIONS }, async () => {
      const s = await RawSocket.open(url, token);
      const lane = async () => {
        while (next < N) {
          const a = await s.call('enroll.begin', await handshake());
          const c = a.error ? a.error.data.code : 'ok';
          byCode[c] = (byCode[c] ?? 0) + 1;
        }
      };
      await Promise.all(Array.from({ length: WINDOW }, lane));
      s.close();
    }),
  );
  return byCode;
}

const mib = (b: number) => Math.round(b / 1048576);
const d = await startDaemon({
  config: {
    ...TEST_CONFIG,
    admin: { host: '127.0.0.1', port: 0 },
    // The flooding tenant is not throttled as a whole: the quotas, not the request rate, must hold.
    limits: { ...TEST_CONFIG.limits, tenantPerSec: 1e6, tenantBurst: 1e6 },
  },
});
const transports: WebSocketTransport[] = [];
const sdk = (token: string) => {
  const transport = new WebSocketTransport({ url: d.url, token, timeoutMs: 120_000 });
  transports.push(transport);
  return new VaultClient({ transport, pinnedKey: pinnedKeyOf(d), kdf: KDF, maxRetries: 0 });
};
try {
  // A day: an older build takes many minutes over the flood.
  const other = await (await adminApi(d)).tenant('other', 86_400);
  const dev = sdk(d.token);
  const oth = sdk(other.token);
  const keys = new Map<string, Uint8Array>();
  for (let i = 0; i < USERS; i++) {
    for (const [c, u] of [[dev, `dev-user-${i}`], [oth, `other-user-${i}`]] as const) {
      const k = new Uint8Array(32).fill(i + 1);
      await c.enrollPassword(u, `pw-${u}`, k);
      keys.set(u, k);
    }
  }
  const desc = await dev.descriptor();
  const rssBefore = rssOf(d.proc.pid!);

  // The other tenant's recoveries, timed, until told to stop.
  const probe = async (ms: number[], stop: () => boolean, failures: string[]) => {
    for (let i = 0; !stop(); i++) {
      const u = `other-user-${i % USERS}`;
      const t0 = performance.now();
      try {
        await oth.recoverWithPassword(u, `pw-${u}`);
        ms.push(performance.now() - t0);
      } catch (e) {
        failures.push(`${u}: ${(e as Error).message}`);
      }
    }
  };
  const before: number[] = [];
  const failures: string[] = [];
  let n = 0;
  await probe(before, () => ++n > 40, failures);

  // The flood, from a child process; the probe goes on here meanwhile.
  const during: number[] = [];
  let flooding = true;
  const probing = probe(during, () => !flooding, failures);
  const t0 = performance.now();
  const child = spawn(
    process.execPath,
    [...process.execArgv, import.meta.filename, '--n', String(N), '--connections', String(CONNECTIONS), '--window', String(WINDOW),
      '--flood-worker', d.url, d.token, Buffer.from(desc.channelKey).toString('hex'), Buffer.from(desc.vaultId).toString('hex')],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  let out = '';
  child.stdout.on('data', (b: Buffer) => (out += b.toString()));
  const code = await new Promise<number | null>((r) => child.on('close', r));
  if (code !== 0) throw new Error(`flood worker exited with ${code}`);
  const byCode = JSON.parse(out.trim().split('\n').pop()!) as Record<string, number>;
  const floodSec = (performance.now() - t0) / 1000;
  flooding = false;
  await probing;
  const rssAfter = rssOf(d.proc.pid!);

  // Every user of both tenants: what the flood left of its record, then the right
  // password (the exact key, and the count back at the limit).
  const lost: string[] = [];
  const left: Record<string, string> = {};
  for (const [u, k] of keys) {
    const c = u.startsWith('dev') ? dev : oth;
    try {
      const st = await c.status(u);
      left[u] = `${st.state} ${st.attemptsLeft}/${st.attemptLimit}`;
      const got = await c.recoverWithPassword(u, `pw-${u}`);
      const after = await c.status(u);
      if (!Buffer.from(got).equals(Buffer.from(k)) || after.attemptsLeft !== after.attemptLimit) lost.push(`${u}: ${JSON.stringify(after)}`);
    } catch (e) {
      lost.push(`${u}: ${(e as Error).message}`);
    }
  }
  const stats = (xs: number[]) => (xs.length ? { n: xs.length, p50: Math.round(median(xs) * 10) / 10, p95: Math.round(quantile(xs, 0.95) * 10) / 10 } : { n: 0 });
  const summary = {
    flood: { handshakes: N, connections: CONNECTIONS, window: WINDOW, seconds: Math.round(floodSec * 10) / 10, perSecond: Math.round(N / floodSec), byCode },
    rssMiB: { before: mib(rssBefore), after: mib(rssAfter) },
    otherTenantRecoveryMs: { before: stats(before), during: stats(during) },
    recoveryFailuresDuringFlood: failures.length,
    firstFailures: failures.slice(0, 5),
    recordsAfterFlood: left,
    lostAfterFlood: lost,
  };
  console.log(JSON.stringify(summary, null, 2));
  process.exitCode = lost.length ? 1 : 0;
} finally {
  for (const t of transports) t.close();
  await d.cleanup();
}
