// The client SDK, transport and CLI parts that need no daemon: the channel
// against the vault-side channel functions, descriptor verification, error
// and exit-code mapping, the vault key file, and the vault-free CLI paths
// (--print-key / --key) run in-process through main().
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { createServer } from 'node:net';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { p256 } from '@noble/curves/nist.js';
import { Channel, VaultClient, decodeDescriptor, raiseKdf } from '../../client/sdk.js';
import { WebSocketTransport, rpcErrorToVaultError } from '../../client/transport.js';
import { CliError, ExitCodes, exitCodeFor, kdfFromEnv, main, parseVaultKey, readVaultKey } from '../../client/cli.js';
import { channelIdOf, channelKeys, openMessage, sealMessage } from '../../protocol/channel.js';
import { descriptorDigest, vaultIdOf, verifyDescriptor, type Descriptor } from '../../protocol/descriptor.js';
import { fromB64, fromHex, toB64, toHex } from '../../protocol/bytes.js';
import { MIN_KDF } from '../../protocol/kdf.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import { CommanderError } from 'commander';
import { codeOf } from '../helpers/codes.js';

const fixed = (byte: number) => new Uint8Array(32).fill(byte);

// A vault identity made of fixed keys, as the HSM would hold them.
const sigSecret = fixed(0x51);
const sigPublic = p256.getPublicKey(sigSecret, false);
const kxSecret = fixed(0x52);
const channelKey = p256.getPublicKey(kxSecret, false);

function descriptorFor(signingPublic: Uint8Array, over: Partial<Descriptor> = {}): Descriptor {
  return { version: 1, vaultId: vaultIdOf(signingPublic), channelKey, epoch: 1, attemptLimit: 10, kdfFloor: MIN_KDF, ...over };
}

/** The vault.descriptor result as the daemon sends it. */
function wireDescriptor(d: Descriptor, signer: Uint8Array) {
  const signature = p256.sign(descriptorDigest(d), signer, { prehash: false, format: 'compact' });
  return {
    descriptor: {
      version: d.version,
      vaultId: toB64(d.vaultId),
      channelKey: toB64(d.channelKey),
      epoch: d.epoch,
      attemptLimit: d.attemptLimit,
      kdfFloor: d.kdfFloor,
      signature: toB64(signature),
    },
    now: 1_764_198_000_000,
  };
}

describe('Channel against the vault-side channel functions', () => {
  const d = descriptorFor(sigPublic);
  const e = fixed(0x53);
  const clock = 1_764_198_000_123;
  const userId = 'alice@example';

  /** What the vault does with an incoming message: Z from its kx key, then open under c2s. */
  function vaultSide(epk: Uint8Array) {
    const z = p256.getSharedSecret(kxSecret, epk, true).slice(1);
    return channelKeys(z, epk, d.vaultId, channelKey);
  }

  it('seals message 0 with epk, id, ts, and the vault opens it under the c2s key and exact header', async () => {
    const ch = new Channel(d, userId, () => clock, e);
    const params = await ch.seal('enroll.begin', { blinded: 'AAAA' });
    const m = params.channel as { id: string; epk: string; n: number; ts: number; ct: string };
    const epk = p256.getPublicKey(e, false);
    expect(params.userId).toBe(userId);
    expect(m.epk).toBe(toB64(epk));
    expect(m.id).toBe(toB64(channelIdOf(epk)));
    expect(m.n).toBe(0);
    expect(m.ts).toBe(clock);

    const keys = vaultSide(fromB64(m.epk)!);
    const header = { dir: 'c2s' as const, channelId: keys.id, counter: 0, method: 'enroll.begin', userId, ts: clock };
    expect(await openMessage(keys.c2s, header, fromB64(m.ct)!)).toEqual({ blinded: 'AAAA' });
    // The relay cannot re-route it: another method, user or ts does not authenticate.
    for (const wrong of [{ method: 'recover.begin' }, { userId: 'bob' }, { ts: clock + 1 }, { counter: 1 }]) {
      expect(await codeOf(openMessage(keys.c2s, { ...header, ...wrong }, fromB64(m.ct)!))).toBe(ErrorCodes.DECRYPT_FAILED);
    }
  });

  it('opens the s2c reply (ts 0), advances n, and sends epk only with n = 0', async () => {
    let now = clock;
    const ch = new Channel(d, userId, () => now, e);
    const first = await ch.seal('recover.begin', { blinded: 'x' });
    const keys = vaultSide(fromB64((first.channel as { epk: string }).epk)!);
    const reply = async (n: number, body: unknown, over: object = {}) => ({
      channel: {
        n,
        ct: toB64(await sealMessage(keys.s2c, { dir: 's2c', channelId: keys.id, counter: n, method: 'recover.begin', userId, ts: 0, ...over }, body)),
      },
    });
    expect(await ch.open('recover.begin', await reply(0, { ok: true, result: { attemptsLeft: 9 } }))).toEqual({ attemptsLeft: 9 });
    expect(ch.counter).toBe(1);

    now += 5_000;
    const second = await ch.seal('recover.finish', { authKey: 'y' });
    const m = second.channel as { epk?: string; n: number; ts: number; ct: string };
    expect(m.epk).toBeUndefined();
    expect(m.n).toBe(1);
    expect(m.ts).toBe(now);
    const h1 = { dir: 'c2s' as const, channelId: keys.id, counter: 1, method: 'recover.finish', userId, ts: now };
    expect(await openMessage(keys.c2s, h1, fromB64(m.ct)!)).toEqual({ authKey: 'y' });
  });

  it('turns an inner {ok:false} into a VaultError with the vault code and detail', async () => {
    const ch = new Channel(d, userId, () => clock, e);
    const p = await ch.seal('enroll.begin', {});
    const keys = vaultSide(fromB64((p.channel as { epk: string }).epk)!);
    const body = { ok: false, error: { code: 'RECORD_EXISTS', message: 'an active record exists', detail: { generation: 3 } } };
    const ct = await sealMessage(keys.s2c, { dir: 's2c', channelId: keys.id, counter: 0, method: 'enroll.begin', userId, ts: 0 }, body);
    const err = await ch.open('enroll.begin', { channel: { n: 0, ct: toB64(ct) } }).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(VaultError);
    expect((err as VaultError).code).toBe(ErrorCodes.RECORD_EXISTS);
    expect((err as VaultError).detail).toEqual({ generation: 3 });
  });

  it('refuses replies for another n, a reflected c2s message, or another method', async () => {
    const mk = async () => {
      const ch = new Channel(d, userId, () => clock, e);
      const p = await ch.seal('enroll.begin', { blinded: 'b' });
      return { ch, p, keys: vaultSide(fromB64((p.channel as { epk: string }).epk)!) };
    };
    const ok = { ok: true, result: {} };
    const s2c = { dir: 's2c' as const, counter: 0, method: 'enroll.begin', userId, ts: 0 };

    let t = await mk();
    let ct = await sealMessage(t.keys.s2c, { ...s2c, channelId: t.keys.id, counter: 1 }, ok);
    expect(await codeOf(t.ch.open('enroll.begin', { channel: { n: 1, ct: toB64(ct) } }))).toBe(ErrorCodes.OUT_OF_ORDER);

    t = await mk();
    // The relay bounces our own request back as the answer.
    expect(await codeOf(t.ch.open('enroll.begin', { channel: { n: 0, ct: (t.p.channel as { ct: string }).ct } }))).toBe(
      ErrorCodes.DECRYPT_FAILED,
    );

    t = await mk();
    ct = await sealMessage(t.keys.s2c, { ...s2c, channelId: t.keys.id, method: 'enroll.finish' }, ok);
    expect(await codeOf(t.ch.open('enroll.begin', { channel: { n: 0, ct: toB64(ct) } }))).toBe(ErrorCodes.DECRYPT_FAILED);
    // A channel that saw a bad reply is done: its counter state is unknown.
    expect(await codeOf(t.ch.seal('enroll.begin', {}))).toBe(ErrorCodes.BAD_REQUEST);
  });
});

describe('descriptor verification', () => {
  const other = fixed(0x61);
  const otherPublic = p256.getPublicKey(other, false);

  it('accepts a descriptor signed by the pinned key', () => {
    const { descriptor, now } = decodeDescriptor(wireDescriptor(descriptorFor(sigPublic), sigSecret));
    expect(now).toBe(1_764_198_000_000);
    expect(toHex(verifyDescriptor(descriptor, sigPublic).channelKey)).toBe(toHex(channelKey));
  });

  it('refuses a descriptor signed by another key, even one naming that key’s own vault id', () => {
    const byOther = decodeDescriptor(wireDescriptor(descriptorFor(otherPublic), other)).descriptor;
    expect(() => verifyDescriptor(byOther, sigPublic)).toThrow(VaultError);
    const claimsOurs = decodeDescriptor(wireDescriptor(descriptorFor(sigPublic), other)).descriptor;
    expect(() => verifyDescriptor(claimsOurs, sigPublic)).toThrow(/not signed by the pinned vault key/);
  });

  it('refuses an edited descriptor (a relay lowering the KDF floor)', () => {
    const wire = wireDescriptor(descriptorFor(sigPublic), sigSecret);
    wire.descriptor.kdfFloor = { alg: 'argon2id', m: 8, t: 1, p: 1 };
    expect(() => verifyDescriptor(decodeDescriptor(wire).descriptor, sigPublic)).toThrow(VaultError);
  });

  it('treats a malformed descriptor as a broken vault, not as a verified one', () => {
    const wire = wireDescriptor(descriptorFor(sigPublic), sigSecret);
    const bad = { ...wire, descriptor: { ...wire.descriptor, channelKey: wire.descriptor.channelKey + '=' } };
    expect(() => decodeDescriptor(bad)).toThrow(VaultError);
    expect(() => decodeDescriptor({})).toThrow(VaultError);
  });

  it('VaultClient refuses a pinned key that is not a P-256 point', () => {
    const transport = { call: async () => ({}), close() {} };
    expect(() => new VaultClient({ transport, pinnedKey: new Uint8Array(65) })).toThrow(VaultError);
    const notOnCurve = new Uint8Array(65).fill(1);
    notOnCurve[0] = 4;
    expect(() => new VaultClient({ transport, pinnedKey: notOnCurve })).toThrow(VaultError);
  });
});

describe('kdf and error mapping', () => {
  it('raises each Argon2id parameter to the highest floor', () => {
    expect(raiseKdf({ alg: 'argon2id', m: 64, t: 1, p: 1 }, MIN_KDF)).toEqual(MIN_KDF);
    expect(raiseKdf({ alg: 'argon2id', m: 65536, t: 1, p: 4 }, MIN_KDF, { alg: 'argon2id', m: 8, t: 3, p: 1 })).toEqual({
      alg: 'argon2id',
      m: 65536,
      t: 3,
      p: 4,
    });
  });

  it('parses BKV_KDF and refuses nonsense as a usage error', () => {
    expect(kdfFromEnv(undefined)).toBeUndefined();
    expect(kdfFromEnv('{"m":64,"t":1,"p":1}')).toEqual({ alg: 'argon2id', m: 64, t: 1, p: 1 });
    for (const bad of ['{"m":"64"}', 'nope', '{"m":64,"t":0,"p":1}', '{"m":99999999,"t":1,"p":1}']) {
      expect(() => kdfFromEnv(bad)).toThrow(CliError);
    }
  });

  it('maps JSON-RPC errors to VaultError(data.code) with flat detail', () => {
    const e = rpcErrorToVaultError({
      code: -32003,
      message: 'rate limit exceeded; retry later',
      data: { code: 'RATE_LIMITED', retryable: true, retryAfterMs: 250 },
    });
    expect(e.code).toBe(ErrorCodes.RATE_LIMITED);
    expect(e.message).toBe('rate limit exceeded; retry later');
    expect(e.detail).toEqual({ retryable: true, retryAfterMs: 250 });
    const nested = rpcErrorToVaultError({ code: -32002, message: 'stale', data: { code: 'STALE_MESSAGE', detail: { now: 5 } } });
    expect(nested.detail).toEqual({ now: 5 });
    // A code this client does not know is not invented: the integer class decides, the original is kept.
    const unknown = rpcErrorToVaultError({ code: -32001, message: 'x', data: { code: 'NEW_THING' } });
    expect(unknown.code).toBe(ErrorCodes.UNAUTHENTICATED);
    expect(unknown.detail).toEqual({ vaultCode: 'NEW_THING' });
    expect(rpcErrorToVaultError(null).code).toBe(ErrorCodes.INTERNAL);
  });

  it('gives every documented failure its exit code', () => {
    const v = (code: VaultError['code']) => new VaultError(code, 'x');
    const table: [unknown, number][] = [
      [v(ErrorCodes.WRONG_PASSWORD), 3],
      [v(ErrorCodes.LOCKED), 4],
      [v(ErrorCodes.RECORD_NOT_FOUND), 5],
      [v(ErrorCodes.HSM_UNAVAILABLE), 6],
      [v(ErrorCodes.VAULT_UNREACHABLE), 6],
      [v(ErrorCodes.OVERLOADED), 6],
      [v(ErrorCodes.RATE_LIMITED), 6],
      [v(ErrorCodes.STORE_UNAVAILABLE), 6],
      [v(ErrorCodes.UNAUTHENTICATED), 9],
      [v(ErrorCodes.FORBIDDEN), 1],
      [v(ErrorCodes.INTERNAL), 1],
      [new CliError(7, 'wrong code'), 7],
      [new CliError(8, 'corrupted'), 8],
      [new CommanderError(1, 'commander.unknownOption', 'x'), 2],
      [new CommanderError(0, 'commander.helpDisplayed', 'x'), 0],
      [new Error('boom'), 1],
      ['not even an error', 1],
    ];
    for (const [err, code] of table) expect([err, exitCodeFor(err)]).toEqual([err, code]);
    expect(Object.values(ExitCodes).sort()).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  });
});

describe('vault key file', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'bkv-key-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('reads a PEM SubjectPublicKeyInfo P-256 key as 0x04‖x‖y', () => {
    const { publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    const pem = publicKey.export({ type: 'spki', format: 'pem' }).toString();
    // Independent reference: an uncompressed P-256 SPKI (DER) ends with the 65-byte point.
    const der = publicKey.export({ type: 'spki', format: 'der' });
    const point = new Uint8Array(der.subarray(der.length - 65));
    const file = join(dir, 'vault-key.pub');
    writeFileSync(file, pem);
    expect(toHex(readVaultKey(file))).toBe(toHex(point));
    expect(p256.Point.fromBytes(readVaultKey(file)).toBytes(false)).toEqual(point);
  });

  it('reads 130 hex digits, with or without whitespace', () => {
    const hex = toHex(sigPublic);
    expect(parseVaultKey(`${hex}\n`)).toEqual(sigPublic);
    expect(parseVaultKey(hex.toUpperCase().replace(/(.{32})/g, '$1 '))).toEqual(fromHex(hex));
  });

  it('refuses other keys and garbage as usage errors', () => {
    const ed = generateKeyPairSync('ed25519').publicKey.export({ type: 'spki', format: 'pem' }).toString();
    const p384 = generateKeyPairSync('ec', { namedCurve: 'secp384r1' }).publicKey.export({ type: 'spki', format: 'pem' }).toString();
    // docs/RPC.md: the pinned key is a public key; Node would derive one from a private key, but bkv must not.
    const p256Private = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
    const pkcs8 = p256Private.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const sec1 = p256Private.privateKey.export({ type: 'sec1', format: 'pem' }).toString();
    for (const [name, text] of [
      ['ed.pem', ed],
      ['p384.pem', p384],
      ['pkcs8-private.pem', pkcs8],
      ['sec1-private.pem', sec1],
      ['short.hex', toHex(sigPublic).slice(2)],
      ['compressed.hex', '02' + toHex(sigPublic).slice(2, 66) + '0'.repeat(64)],
      ['junk', 'hello'],
    ] as const) {
      writeFileSync(join(dir, name), text);
      const err = (() => {
        try {
          readVaultKey(join(dir, name));
        } catch (e) {
          return e;
        }
      })();
      expect([name, err instanceof CliError && err.exitCode]).toEqual([name, ExitCodes.USAGE]);
    }
    expect(() => readVaultKey(join(dir, 'missing'))).toThrow(CliError);
  });
});

describe('transport without a vault', () => {
  it('reports a closed port as "vault unreachable" (VAULT_UNREACHABLE, detail.unreachable)', async () => {
    const srv = createServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
    const port = (srv.address() as { port: number }).port;
    await new Promise((r) => srv.close(r));
    const t = new WebSocketTransport({ url: `ws://127.0.0.1:${port}`, token: 'secret-token-value' });
    const err = (await t.call('health', {}).catch((e: unknown) => e)) as VaultError;
    t.close();
    expect(err).toBeInstanceOf(VaultError);
    expect(err.code).toBe(ErrorCodes.VAULT_UNREACHABLE);
    expect(err.detail?.unreachable).toBe(true);
    expect(err.message).toMatch(/^vault unreachable: /);
    expect(err.message).not.toContain('secret-token-value');
  });

  it('refuses URLs that are not ws:// or wss://', () => {
    expect(() => new WebSocketTransport({ url: 'http://127.0.0.1:1' })).toThrow(VaultError);
  });
});

describe('bkv without a vault (in-process main)', () => {
  let dir: string;
  const plain = () => join(dir, 'plain.bin');
  const data = randomBytes(300_000);

  function io(stdin = '', env: Record<string, string | undefined> = {}, tty = false) {
    const out: string[] = [];
    const err: string[] = [];
    return {
      out,
      err,
      io: {
        stdin: Readable.from(stdin ? [Buffer.from(stdin)] : []),
        stdout: { write: (s: string) => out.push(s) },
        stderr: { write: (s: string) => err.push(s), isTTY: tty, columns: 80 },
        env,
      },
    };
  }

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'bkv-cli-'));
    writeFileSync(plain(), data);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  async function printKey(out: string): Promise<string> {
    const c = io();
    expect(await main(['backup', 'create', '--in', plain(), '--out', out, '--print-key'], c.io)).toBe(0);
    expect(c.err.join('')).toBe('');
    const code = c.out.join('').trim();
    expect(code).toMatch(/^([0-9A-F]{4} ){15}[0-9A-F]{4}$/);
    return code;
  }

  it('--print-key then --key round-trips, with no vault settings at all', async () => {
    const bkv = join(dir, 'a.bkv');
    const code = await printKey(bkv);
    expect(existsSync(`${bkv}.partial`)).toBe(false);
    const back = join(dir, 'a.out');
    const c = io();
    expect(await main(['backup', 'restore', '--in', bkv, '--out', back, '--key', code.toLowerCase().replace(/ /g, '-')], c.io)).toBe(0);
    expect(Buffer.compare(readFileSync(back), data)).toBe(0);
    // --key-stdin: the code never appears in argv.
    const back2 = join(dir, 'a2.out');
    expect(await main(['backup', 'restore', '--in', bkv, '--out', back2, '--key-stdin'], io(`${code}\n`).io)).toBe(0);
    expect(Buffer.compare(readFileSync(back2), data)).toBe(0);
  });

  it('a wrong or malformed code exits 7 without output and without echoing digits', async () => {
    const bkv = join(dir, 'b.bkv');
    const code = await printKey(bkv);
    const wrong = (code[0] === 'A' ? 'B' : 'A') + code.slice(1);
    const back = join(dir, 'b.out');
    for (const k of [wrong, code.slice(0, -1), code.replace(/.$/, 'G')]) {
      const c = io();
      expect(await main(['backup', 'restore', '--in', bkv, '--out', back, '--key', k], c.io)).toBe(ExitCodes.WRONG_KEY);
      const msg = c.err.join('');
      expect(msg.split('\n').filter(Boolean)).toHaveLength(1);
      expect(msg).not.toContain(code.slice(5, 14));
      expect(existsSync(back) || existsSync(`${back}.partial`)).toBe(false);
    }
  });

  it('a truncated, corrupted or non-backup file exits 8 and leaves no output behind', async () => {
    const bkv = join(dir, 'c.bkv');
    const code = await printKey(bkv);
    const full = readFileSync(bkv);
    const cases: [string, Buffer][] = [
      ['cut-tail', full.subarray(0, full.length - 100)],
      ['cut-header', full.subarray(0, 30)],
      ['flipped', Buffer.from(full.map((b, i) => (i === 1000 ? b ^ 1 : b)))],
      ['appended', Buffer.concat([full, Buffer.from('more')])],
      ['not-a-backup', Buffer.from('hello world, definitely not a backup')],
      ['empty', Buffer.alloc(0)],
    ];
    for (const [name, bytes] of cases) {
      const f = join(dir, `${name}.bkv`);
      writeFileSync(f, bytes);
      const back = join(dir, `${name}.out`);
      const c = io();
      expect([name, await main(['backup', 'restore', '--in', f, '--out', back, '--key', code], c.io)]).toEqual([name, ExitCodes.CORRUPTED]);
      expect([name, existsSync(back), existsSync(`${back}.partial`)]).toEqual([name, false, false]);
    }
  });

  it('usage errors exit 2: no key source, both sources, passwords as arguments, existing output', async () => {
    const bkv = join(dir, 'd.bkv');
    await printKey(bkv);
    const cases: string[][] = [
      ['backup', 'create', '--in', plain(), '--out', join(dir, 'x.bkv')],
      ['backup', 'create', '--in', plain(), '--out', join(dir, 'x.bkv'), '--print-key', '--user', 'u', '--password-stdin'],
      ['backup', 'create', '--in', plain(), '--out', join(dir, 'x.bkv'), '--user', 'u', '--password', 'hunter2'],
      ['backup', 'create', '--in', plain(), '--out', join(dir, 'x.bkv'), '--user', 'u'],
      ['backup', 'create', '--in', plain(), '--out', bkv, '--print-key'],
      ['backup', 'restore', '--in', bkv, '--out', join(dir, 'y')],
      ['backup', 'restore', '--in', bkv, '--out', join(dir, 'y'), '--key', 'AAAA', '--user', 'u', '--password-stdin'],
      ['vault', 'status'],
      ['vault', 'status', '--user', 'u'], // no vault key configured
      ['frobnicate'],
      [],
    ];
    for (const argv of cases) {
      const c = io();
      expect([argv.join(' '), await main(argv, c.io)]).toEqual([argv.join(' '), ExitCodes.USAGE]);
      expect(c.err.join('')).not.toContain('hunter2');
      expect(c.err.join('')).not.toMatch(/\n\s+at /); // no stack trace
    }
    expect(await main(['--help'], io().io)).toBe(0);
  });

  it('an unreachable vault exits 6', async () => {
    const keyFile = join(dir, 'vk.hex');
    writeFileSync(keyFile, toHex(sigPublic));
    const c = io('', { BKV_VAULT: 'ws://127.0.0.1:1', BKV_TOKEN: 't', BKV_VAULT_KEY: keyFile });
    expect(await main(['vault', 'status', '--user', 'u'], c.io)).toBe(ExitCodes.UNAVAILABLE);
    expect(c.err.join('')).toMatch(/^bkv: vault unreachable: .*\n$/);
  });

  it('draws progress only for files over 4 MiB on a terminal', async () => {
    const big = join(dir, 'big.bin');
    writeFileSync(big, randomBytes(5 * 1024 * 1024));
    const tty = io('', {}, true);
    expect(await main(['backup', 'create', '--in', big, '--out', join(dir, 'big.bkv'), '--print-key'], tty.io)).toBe(0);
    expect(tty.err.join('')).toMatch(/encrypting \[#+\] 100% 5\.0\/5\.0 MiB\n$/);
    const pipe = io('', {}, false);
    expect(await main(['backup', 'create', '--in', big, '--out', join(dir, 'big2.bkv'), '--print-key'], pipe.io)).toBe(0);
    expect(pipe.err.join('')).toBe('');
    const small = io('', {}, true);
    expect(await main(['backup', 'create', '--in', plain(), '--out', join(dir, 'small.bkv'), '--print-key'], small.io)).toBe(0);
    expect(small.err.join('')).toBe('');
  });
});
