// What a real cohort keeps doing by itself. Seal-epoch rotation (docs/COHORT.md,
// "Rotation across the cohort"): 3 real daemons on a 3-member etcd, each with its own SoftHSM2 token
// (copies of one vault's token that is also its own ceremony target and trusts
// it, as after a key ceremony). With node 3 down, `rotate` on node 1 carries the
// new epoch key to node 2 through a ceremony bundle in etcd, re-seals every
// record, and destroys the old key on nodes 1 and 2; it names node 3 as still
// owing. Node 3, started again, imports the new epoch and destroys the old one
// before it serves, and the records it serves are the re-sealed ones.
// And a record whose last counted guess was abandoned on a node that then died
// is destroyed by the others once that guess expires, not left at 0 attempts.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport as WsTransport, type Transport } from '../../client/transport.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import { ADMIN, TEST_CONFIG, type RunningDaemon } from '../helpers/daemon.js';
import { startTestCohort, type TestCohort } from '../helpers/cohort.js';
import { TEST_KDF } from '../helpers/vault.js';

const adminInfo = (d: RunningDaemon) => ({
  url: (JSON.parse(readFileSync(join(d.dataDir, 'admin.json'), 'utf8')) as { url: string }).url,
  token: readFileSync(join(d.dataDir, 'admin-token'), 'utf8').trim(),
});

async function adminGet<T>(d: RunningDaemon, path: string): Promise<T> {
  const a = adminInfo(d);
  return (await (await fetch(a.url + path, { headers: { authorization: `Bearer ${a.token}` } })).json()) as T;
}

/** POST /admin/rotate: NDJSON lines (progress, then result or error). */
async function rotate(d: RunningDaemon, body: object): Promise<Record<string, unknown>[]> {
  const a = adminInfo(d);
  const res = await fetch(a.url + '/admin/rotate', {
    method: 'POST',
    headers: { authorization: `Bearer ${a.token}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  return (await res.text())
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

function admin(data: string, ...args: string[]): { code: number | null; stdout: string; stderr: string } {
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith('BKV_') || k === 'SOFTHSM2_CONF') delete env[k];
  const r = spawnSync(process.execPath, [ADMIN, ...args, '--data', data], { env, encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

interface Status {
  policy: { epochs: number[] };
  cohort: { keyring?: { current: number; retired: number; rotation: unknown; last: { epoch: number; destroyedOn: string[]; pending: string[] } | null } };
}

describe('a 3-node cohort keeps itself: seal-epoch rotation, guesses orphaned by a dead node', () => {
  let t: TestCohort;
  let nodes: RunningDaemon[];
  let pinnedKey: Uint8Array;
  const client = (d: RunningDaemon) => t.client(d);

  beforeAll(async () => {
    t = await startTestCohort({
      prefix: 't-rot',
      // Short sessions (the minimum): an abandoned guess expires within the test.
      nodeConfig: { vault: { ...TEST_CONFIG.vault, sessionTtlSec: 5 } },
      // The ceremony's two steps on the seed, so every copy is a target that every copy trusts.
      prepareSeed: (seed) => {
        const init = admin(seed, 'ceremony', 'target-init');
        expect(init.code, init.stderr).toBe(0);
        const fp = (JSON.parse(readFileSync(join(seed, 'ceremony-target.json'), 'utf8')) as { fingerprint: string }).fingerprint;
        const trust = admin(seed, 'ceremony', 'trust', '--target', join(seed, 'ceremony-target.json'), '--fingerprint', fp);
        expect(trust.code, trust.stderr).toBe(0);
      },
    });
    ({ nodes, pinnedKey } = t);
  }, 120_000);

  afterAll(async () => {
    await t?.stop();
  });

  it('with node 3 down: the new epoch reaches node 2 by a ceremony bundle, every record is re-sealed, the old key is destroyed on nodes 1 and 2, and node 3 catches up before serving', async () => {
    const c1 = client(nodes[0]!);
    await c1.enrollPassword('alice', 'pw alice', new Uint8Array(32).fill(1));
    await c1.enrollPassword('bob', 'pw bob', new Uint8Array(32).fill(2));
    c1.close();
    for (const n of nodes) expect((await adminGet<Status>(n, '/admin/status')).policy.epochs).toEqual([1]);

    const n3 = nodes[2]!;
    await n3.stop();
    const lines = await rotate(nodes[0]!, { waitSec: 3 });
    const result = lines.find((l) => l.result)?.result as Record<string, unknown> | undefined;
    expect(result, JSON.stringify(lines)).toMatchObject({ epoch: 2, resealed: 2, unreadable: 0, destroyedEpochs: [1], destroyedOn: ['n1', 'n2'], pendingNodes: ['n3'] });

    // The old key is gone from the HSMs of nodes 1 and 2; the keyring says node 3 still owes it.
    for (const n of nodes.slice(0, 2)) {
      const s = await adminGet<Status>(n, '/admin/status');
      expect(s.policy.epochs).toEqual([2]);
      expect(s.cohort.keyring).toMatchObject({ current: 2, retired: 1, rotation: null, last: { epoch: 2, destroyedOn: ['n1', 'n2'], pending: ['n3'] } });
    }
    // Node 2 never held epoch 2 before the rotation: it serves a re-sealed record with the key it imported.
    const c2 = client(nodes[1]!);
    expect(await c2.recoverWithPassword('alice', 'pw alice')).toEqual(new Uint8Array(32).fill(1));
    // A record enrolled after the rotation is sealed under epoch 2.
    await c2.enrollPassword('carol', 'pw carol', new Uint8Array(32).fill(3));
    c2.close();

    // Node 3 starts with epoch 1 in its HSM: it imports 2 and destroys 1 before it listens.
    nodes[2] = await n3.restart();
    const logs = nodes[2].logs.join('\n');
    expect(logs.indexOf('"event":"cohort.keyring.imported"')).toBeGreaterThan(-1);
    expect(logs.indexOf('"event":"cohort.keyring.destroyed"')).toBeGreaterThan(-1);
    expect(logs.indexOf('"event":"cohort.keyring.destroyed"')).toBeLessThan(logs.indexOf('"event":"listening"'));
    const s3 = await adminGet<Status>(nodes[2], '/admin/status');
    expect(s3.policy.epochs).toEqual([2]);
    expect(s3.cohort.keyring).toMatchObject({ current: 2, last: { destroyedOn: ['n1', 'n2', 'n3'], pending: [] } });
    const c3 = client(nodes[2]);
    expect(await c3.recoverWithPassword('bob', 'pw bob')).toEqual(new Uint8Array(32).fill(2));
    expect(await c3.recoverWithPassword('carol', 'pw carol')).toEqual(new Uint8Array(32).fill(3));
    c3.close();

    // --resume with no rotation under way changes nothing.
    expect((await rotate(nodes[1]!, { resume: true })).find((l) => l.result)?.result).toMatchObject({ epoch: 2, resealed: 0 });
  }, 120_000);

  it('a record whose 10th counted guess was abandoned on a node killed before its finish is destroyed by the other nodes once the guess expires', async () => {
    const c1 = client(nodes[0]!);
    await c1.enrollPassword('orphan', 'pw orphan', new Uint8Array(32).fill(9));
    for (let i = 0; i < 9; i++) await expect(c1.recoverWithPassword('orphan', `wrong ${i}`)).rejects.toMatchObject({ code: ErrorCodes.WRONG_PASSWORD });
    expect((await c1.status('orphan')).attemptsLeft).toBe(1);
    // The 10th guess is counted by node 3's recover.begin; its finish never leaves, and node 3 dies.
    const real = new WsTransport({ url: nodes[2]!.url, token: nodes[2]!.token });
    const cut: Transport = {
      call: (method, params) =>
        method === 'recover.finish' ? Promise.reject(new VaultError(ErrorCodes.VAULT_UNREACHABLE, 'relay lost the connection', { sent: false })) : real.call(method, params),
      close: () => real.close(),
    };
    const c3 = new VaultClient({ transport: cut, pinnedKey, kdf: TEST_KDF, maxRetries: 0 });
    await expect(c3.recoverWithPassword('orphan', 'wrong 9')).rejects.toMatchObject({ code: ErrorCodes.VAULT_UNREACHABLE });
    c3.close();
    await nodes[2]!.stop('SIGKILL');
    // Counted and pending: no attempt left, but not destroyed while the guess may still be finished.
    expect(await c1.status('orphan')).toMatchObject({ state: 'active', attemptsLeft: 0 });
    // After the guess's expiry (5 s) and the grace (2 s), nodes 1 and 2 destroy it. Before the
    // orphan sweep, it stayed active with 0 attempts left until someone called recover.begin.
    const deadline = Date.now() + 20_000;
    let s = await c1.status('orphan');
    while (s.state === 'active' && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 250));
      s = await c1.status('orphan');
    }
    expect(s.state).toBe('locked');
    expect(nodes.slice(0, 2).some((n) => n.logs.some((l) => l.includes('"orphaned":true')))).toBe(true);
    c1.close();
    nodes[2] = await nodes[2]!.restart();
  }, 60_000);
});
