// The audit log: hash chain plus checkpoints signed by the real HSM `sig` key
// (SoftHSM2 token), verified offline with the vault public key only — by the
// library and by `bkv-admin audit verify` as an operator runs it.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { appendFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { p256 } from '@noble/curves/nist.js';
import { ADMIN } from '../helpers/daemon.js';
import { tempVault, type TestVault } from '../helpers/vault.js';
import { AuditLog } from '../../vault/audit/log.js';
import { encodeLine, lineHash, publicKeyFromText, verifyAudit, checkpointDigest } from '../../vault/audit/chain.js';
import { auditEventOf } from '../../vault/audit/events.js';
import { publicKeyPem } from '../../vault/setup.js';
import { toHex } from '../../protocol/bytes.js';

let tv: TestVault;
let dir: string;
let keyFile: string;
let pub: Uint8Array;
let good: string;

const opts = { checkpointEvery: 4, checkpointSec: 3600 };

beforeAll(async () => {
  tv = await tempVault();
  dir = mkdtempSync(join(tmpdir(), 'bkv-audit-'));
  pub = tv.vault.keys.signingPublic;
  keyFile = join(dir, 'vault-key.pub');
  writeFileSync(keyFile, publicKeyPem(pub));
  // A log with two automatic checkpoints (every 4 events) and a final one at close.
  const file = join(dir, 'good.log');
  const log = AuditLog.open(file, opts);
  log.attachSigner({ vaultId: tv.vault.vaultId, sign: (d) => tv.vault.keys.sign(d) });
  for (let i = 0; i < 10; i++) log.append(i % 3 ? 'recover.finish' : 'enroll.finish', { user: `u${i}`, outcome: 'wrong-password', attemptsLeft: 9 - i });
  await log.checkpoint();
  log.append('record.locked', { user: 'u9' });
  await log.close();
  good = readFileSync(file, 'utf8');
});

afterAll(() => {
  tv?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const lines = (t: string) => t.trimEnd().split('\n');
const join_ = (ls: string[]) => ls.join('\n') + '\n';

function verifyCli(text: string, name: string) {
  const file = join(dir, name);
  writeFileSync(file, text);
  return spawnSync(process.execPath, [ADMIN, 'audit', 'verify', '--file', file, '--key', keyFile], { encoding: 'utf8' });
}

describe('audit log', () => {
  it('an untouched log verifies: intact chain, every HSM checkpoint signature valid, nothing unsigned at the end', () => {
    const r = verifyAudit(good, pub);
    expect(r.problems).toEqual([]);
    expect(r.ok).toBe(true);
    expect(r.checkpoints).toBeGreaterThanOrEqual(3);
    expect(r.unsignedTail).toBe(0);
    const cli = verifyCli(good, 'good-copy.log');
    expect(cli.status).toBe(0);
    expect(cli.stdout).toContain('OK: the chain is intact');
  });

  it('detects a modified line', () => {
    const ls = lines(good);
    ls[2] = ls[2]!.replace(/"attemptsLeft":\d+/, '"attemptsLeft":9');
    expect(ls[2]).not.toBe(lines(good)[2]);
    const r = verifyAudit(join_(ls), pub);
    expect(r.ok).toBe(false);
    expect(r.problems[0]).toMatchObject({ line: 3 });
    expect(r.problems[0]!.message).toMatch(/modified/);
    const cli = verifyCli(join_(ls), 'modified.log');
    expect(cli.status).toBe(3);
    expect(cli.stdout).toContain('line 3:');
  });

  it('detects a removed line', () => {
    const ls = lines(good);
    ls.splice(4, 1);
    const r = verifyAudit(join_(ls), pub);
    expect(r.ok).toBe(false);
    expect(r.problems[0]).toMatchObject({ line: 5 });
    expect(r.problems[0]!.message).toMatch(/removed/);
    expect(verifyCli(join_(ls), 'removed.log').status).toBe(3);
  });

  it('detects reordered lines', () => {
    const ls = lines(good);
    [ls[1], ls[2]] = [ls[2]!, ls[1]!];
    const r = verifyAudit(join_(ls), pub);
    expect(r.ok).toBe(false);
    expect(r.problems.map((p) => p.line)).toContain(2);
    expect(r.problems.some((p) => /reordered/.test(p.message))).toBe(true);
    expect(verifyCli(join_(ls), 'reordered.log').status).toBe(3);
  });

  it('detects a wholesale rewrite with a recomputed chain: the HSM checkpoints no longer match', () => {
    // An attacker who can write the file edits line 2 and re-hashes everything after it.
    const parsed = lines(good).map((l) => JSON.parse(l) as Record<string, unknown>);
    parsed[1]!.outcome = 'ok';
    let prev = '0'.repeat(64);
    const rewritten = parsed.map((o) => {
      const { seq, time, event, prev: _p, hash: _h, ...fields } = o as { seq: number; time: string; event: string; prev: string; hash: string };
      const { line, hash } = encodeLine(seq, time, event, fields as never, prev);
      prev = hash;
      return line;
    });
    const r = verifyAudit(join_(rewritten), pub);
    expect(r.ok).toBe(false);
    expect(r.problems.every((p) => /checkpoint/.test(p.message))).toBe(true);
    expect(r.signedThrough).toBe(0);
  });

  it('refuses a checkpoint signed by another key', () => {
    const other = p256.utils.randomSecretKey();
    const ls = lines(good);
    const cp = ls.findIndex((l) => l.includes('"audit.checkpoint"'));
    const o = JSON.parse(ls[cp]!) as { seq: number; time: string; vaultId: string; headSeq: number; headHash: string; prev: string };
    const forged = p256.sign(checkpointDigest(tv.vault.vaultId, o.headSeq, o.headHash), other, { prehash: false, format: 'compact' });
    ls[cp] = encodeLine(o.seq, o.time, 'audit.checkpoint', { vaultId: o.vaultId, headSeq: o.headSeq, headHash: o.headHash, sig: toHex(forged) }, o.prev).line;
    // Keep the rest of the chain consistent so only the signature is wrong.
    let prev = JSON.parse(ls[cp]!).hash as string;
    for (let i = cp + 1; i < ls.length; i++) {
      const { seq, time, event, prev: _p, hash: _h, ...fields } = JSON.parse(ls[i]!) as { seq: number; time: string; event: string; prev: string; hash: string };
      const e = encodeLine(seq, time, event, fields as never, prev);
      ls[i] = e.line;
      prev = e.hash;
    }
    const r = verifyAudit(join_(ls), pub);
    expect(r.ok).toBe(false);
    expect(r.problems.some((p) => /signature does not verify/.test(p.message) && p.line === cp + 1)).toBe(true);
  });

  it('a half-written last line (crash) is cut off at the next open and the cut is recorded', async () => {
    const file = join(dir, 'crash.log');
    writeFileSync(file, good);
    appendFileSync(file, '{"seq":99,"time":"2026-');
    expect(verifyAudit(readFileSync(file, 'utf8'), pub).problems.at(-1)!.message).toMatch(/incomplete/);
    const log = AuditLog.open(file, opts);
    log.attachSigner({ vaultId: tv.vault.vaultId, sign: (d) => tv.vault.keys.sign(d) });
    await log.close();
    const text = readFileSync(file, 'utf8');
    expect(text).toContain('"event":"audit.recovered","droppedBytes":23');
    expect(verifyAudit(text, pub).ok).toBe(true);
  });

  it('will not extend a chain whose last line was tampered with', () => {
    const file = join(dir, 'tampered-tail.log');
    const ls = lines(good);
    ls[ls.length - 1] = ls.at(-1)!.replace('"headSeq":', '"headSeq":1');
    writeFileSync(file, join_(ls));
    expect(() => AuditLog.open(file, opts)).toThrow(/does not check out/);
  });

  it('keeps only allow-listed fields of security events, so nothing else in a log line can reach it', () => {
    const line = JSON.stringify({ level: 30, time: 1, event: 'recover.finish', user: 'abcd', outcome: 'ok', authKey: 'secret!', password: 'pw', msg: 'x' });
    expect(auditEventOf(line)).toEqual({ event: 'recover.finish', fields: { user: 'abcd', outcome: 'ok' }, time: 1 });
    expect(auditEventOf(JSON.stringify({ event: 'rpc', method: 'x' }))).toBeUndefined();
    expect(lineHash('{}')).toMatch(/^[0-9a-f]{64}$/);
    expect(toHex(publicKeyFromText(readFileSync(keyFile, 'utf8')))).toBe(toHex(pub));
  });
});
