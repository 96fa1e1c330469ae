// A cohort node talks to etcd over TLS with a client certificate (docs/COHORT.md,
// "TLS to etcd"; THREAT-MODEL R19): etcd is kept to the vault nodes by
// --client-cert-auth, and a node pins etcd's CA from its config. A real etcd
// (one member is a quorum of one) with certificates made here by openssl, and a
// real daemon: with its client certificate it enrols and recovers; without one
// etcd refuses it, and the node exits 3 (no quorum) instead of serving alone.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport } from '../../client/transport.js';
import { readVaultKey } from '../../client/cli.js';
import { loadConfig } from '../../vault/config.js';
import { startDaemon, TEST_CONFIG, type RunningDaemon } from '../helpers/daemon.js';
import { ETCD_BIN, freePorts } from '../helpers/etcd.js';
import { configError } from '../helpers/cohort.js';
import { TEST_KDF } from '../helpers/vault.js';

const openssl = (dir: string, ...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });

/** A CA, a server certificate for 127.0.0.1 and a client certificate, P-256. */
function makePki(dir: string): void {
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl(dir, 'req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=bkv test etcd CA');
  writeFileSync(join(dir, 'server.ext'), 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  writeFileSync(join(dir, 'client.ext'), 'extendedKeyUsage=clientAuth\n');
  for (const [name, subj] of [['server', '/CN=127.0.0.1'], ['client', '/CN=bkv-node']] as const) {
    openssl(dir, 'req', '-new', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', subj);
    openssl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${name}.pem`, '-days', '2', '-extfile', `${name}.ext`);
  }
}

describe('a cohort node on etcd over TLS with client-certificate auth', () => {
  let dir = '';
  let etcd: ChildProcess | undefined;
  let endpoint = '';
  const daemons: RunningDaemon[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'bkv-etcd-tls-'));
    makePki(dir);
    const [client, peer, metrics] = await freePorts(3);
    endpoint = `https://127.0.0.1:${client}`;
    etcd = spawn(
      ETCD_BIN,
      [
        '--name', 'n1', '--data-dir', join(dir, 'n1.etcd'),
        '--listen-client-urls', endpoint, '--advertise-client-urls', endpoint,
        '--cert-file', join(dir, 'server.pem'), '--key-file', join(dir, 'server.key'),
        '--client-cert-auth', '--trusted-ca-file', join(dir, 'ca.pem'),
        '--listen-peer-urls', `http://127.0.0.1:${peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${peer}`,
        '--initial-cluster', `n1=http://127.0.0.1:${peer}`,
        '--listen-metrics-urls', `http://127.0.0.1:${metrics}`,
        '--logger', 'zap', '--log-outputs', join(dir, 'etcd.log'),
      ],
      { stdio: 'ignore' },
    );
    // Health over the plain metrics listener: the client port wants a certificate.
    const deadline = Date.now() + 30_000;
    for (;;) {
      const ok = await fetch(`http://127.0.0.1:${metrics}/health`).then((r) => r.ok, () => false);
      if (ok) break;
      if (Date.now() > deadline) throw new Error('etcd with TLS did not become healthy');
      await new Promise((r) => setTimeout(r, 100));
    }
  }, 60_000);

  afterAll(async () => {
    for (const d of daemons) await d.stop('SIGKILL');
    if (etcd?.pid) process.kill(etcd.pid, 'SIGKILL');
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('refuses https:// endpoints without the CA, and TLS settings without https://, by field', () => {
    const bad = (cohort: object) => configError({ cohort });
    expect(bad({ endpoints: ['https://127.0.0.1:2379'], nodeId: 'n1' })).toMatch(/cohort\.tls: https:\/\/ endpoints need cohort\.tls\.caFile/);
    expect(bad({ endpoints: ['http://127.0.0.1:2379'], nodeId: 'n1', tls: { caFile: 'ca.pem' } })).toMatch(/cohort\.tls: cohort\.tls needs https:\/\/ endpoints/);
    expect(bad({ endpoints: ['https://127.0.0.1:2379'], nodeId: 'n1', tls: { caFile: 'ca.pem', certFile: 'c.pem' } })).toMatch(/certFile and keyFile go together/);
    expect(loadConfig({ env: { BKV_COHORT_ENDPOINTS: 'https://a:1', BKV_COHORT_NODE_ID: 'x', BKV_COHORT_TLS_CA: '/ca', BKV_COHORT_TLS_CERT: '/c', BKV_COHORT_TLS_KEY: '/k' } }).cohort?.tls).toEqual({
      caFile: '/ca',
      certFile: '/c',
      keyFile: '/k',
    });
  });

  it('with its client certificate the node serves; without one etcd refuses it and it exits 3', async () => {
    const tls = { caFile: join(dir, 'ca.pem'), certFile: join(dir, 'client.pem'), keyFile: join(dir, 'client.key') };
    const d = await startDaemon({ config: { ...TEST_CONFIG, cohort: { endpoints: [endpoint], prefix: 't-tls', nodeId: 'n1', tls } } });
    daemons.push(d);
    const c = new VaultClient({ transport: new WebSocketTransport({ url: d.url, token: d.token }), pinnedKey: readVaultKey(d.vaultKeyFile), kdf: TEST_KDF, maxRetries: 0 });
    await c.enrollPassword('tess', 'pw tess', new Uint8Array(32).fill(4));
    expect(await c.recoverWithPassword('tess', 'pw tess')).toEqual(new Uint8Array(32).fill(4));
    c.close();
    expect(d.logs.some((l) => l.includes('"event":"cohort.start"'))).toBe(true);

    const err = await startDaemon({ config: { ...TEST_CONFIG, cohort: { endpoints: [endpoint], prefix: 't-tls', nodeId: 'n2', startTimeoutSec: 2, tls: { caFile: tls.caFile } } } }).then(
      (x) => {
        daemons.push(x);
        return '';
      },
      (e: Error) => e.message,
    );
    expect(err).toMatch(/daemon exited with 3/);
    expect(err).toMatch(/no etcd quorum answered within 2000 ms/);
  }, 60_000);
});
