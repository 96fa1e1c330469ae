#!/usr/bin/env node
// `bkv`: encrypted backups whose key is escrowed in the vault behind a
// password (or written down as a 64-digit code). A thin shell around the SDK
// and the BKV1 file format; everything here is files, stdin and exit codes.
//
// Rules the whole file keeps:
// - Secrets never come from argv (except the 64-digit code via --key, which
//   the contract requires; --key-stdin avoids it) and never reach stderr.
// - Errors are one line on stderr with a documented exit code, no stacks.
// - Output goes to a new file beside OUT (created exclusively, mode 0600, a
//   random name, never through a link: lib/safe-file.ts) and is renamed over
//   OUT only after the whole stream authenticated, so a failed restore never
//   leaves a half file, and nothing is ever written through a name someone
//   else planted (the old fixed OUT.partial could be a symlink to their file).
import { createReadStream, createWriteStream, readFileSync, realpathSync, rmSync } from 'node:fs';
import { lstat, open, rename, stat, unlink } from 'node:fs/promises';
import { createPublicKey } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { pathToFileURL } from 'node:url';
import { Command, CommanderError } from 'commander';
import { VaultError, ErrorCodes, BKV_EXIT, errorSpec } from '../protocol/errors.js';
import { createTemp } from '../lib/safe-file.js';
import { fromB64, fromHex } from '../protocol/bytes.js';
import { checkKdfParams, type KdfParams } from '../protocol/kdf.js';
import { openBackup, readBackupHeader, sealBackup, HEADER_LENGTH } from './backup-format.js';
import { formatKeyCode, generateBackupKey, parseKeyCode } from './backup-code.js';
import { VaultClient } from './sdk.js';
import { WebSocketTransport, parseVaultUrls } from './transport.js';

/** bkv's exit codes (README.md, --help); which error exits with which is the error table's (protocol/errors.ts). */
export const ExitCodes = BKV_EXIT;

const DEFAULT_VAULT = 'ws://127.0.0.1:8787';
/** Smaller files finish before a progress bar would be worth drawing. */
const PROGRESS_MIN_BYTES = 4 * 1024 * 1024;

/** An error whose exit code the CLI already decided. Its message must hold no secret. */
export class CliError extends Error {
  constructor(
    readonly exitCode: number,
    message: string,
  ) {
    super(message);
    this.name = 'CliError';
  }
}
const usage = (msg: string) => new CliError(ExitCodes.USAGE, msg);

/** The documented exit code for any error main() can see. */
export function exitCodeFor(e: unknown): number {
  if (e instanceof CliError) return e.exitCode;
  if (e instanceof CommanderError) {
    return e.exitCode === 0 ? ExitCodes.OK : ExitCodes.USAGE; // --help is 0; a bare `bkv` shows help as an error
  }
  if (e instanceof VaultError) return errorSpec(e.code)?.bkv ?? ExitCodes.OTHER;
  return ExitCodes.OTHER;
}

/** One line, no stack. VaultError and CliError messages are static text by contract. */
export function messageFor(e: unknown): string {
  let m = e instanceof Error ? e.message : 'unexpected error';
  if (e instanceof VaultError && e.code === ErrorCodes.FORBIDDEN) m = `${m} (check --vault-key)`;
  if (e instanceof VaultError && e.detail?.outcomeUnknown === true) m = `${m}; see bkv vault status`;
  return m.replace(/\s*[\r\n]+\s*/g, ' ').trim() || 'unexpected error';
}

/**
 * Errors out of openBackup → 7 (wrong key) or 8 (corrupted, truncated, not a
 * backup). Anything that is not a VaultError came from the file system.
 * backup-format.ts tells "wrong key" from corruption only by message text.
 */
export function backupFileError(e: unknown, wrongKeyHint: string): unknown {
  if (!(e instanceof VaultError)) return e;
  if (e.code === ErrorCodes.DECRYPT_FAILED && e.message === 'wrong backup key') return new CliError(ExitCodes.WRONG_KEY, wrongKeyHint);
  if (e.code === ErrorCodes.DECRYPT_FAILED || e.code === ErrorCodes.BAD_REQUEST) {
    return new CliError(ExitCodes.CORRUPTED, e.code === ErrorCodes.BAD_REQUEST ? e.message : 'backup is corrupted or truncated');
  }
  return e;
}

// ---- the vault key file ------------------------------------------------------------

/**
 * `vault-key.pub` (PEM SubjectPublicKeyInfo of a P-256 key: "-----BEGIN PUBLIC KEY-----")
 * or the 65-byte uncompressed point as 130 hex digits → 65-byte 0x04‖x‖y (docs/RPC.md).
 * Only a public key: a private key or a certificate is refused, though Node would
 * derive one from either, so what is pinned is exactly what the docs describe.
 */
export function parseVaultKey(text: string): Uint8Array {
  const compact = text.replace(/\s+/g, '');
  if (/^[0-9a-fA-F]{130}$/.test(compact)) {
    const k = fromHex(compact);
    if (k[0] !== 0x04) throw new Error('hex vault key must be an uncompressed point (starting 04)');
    return k;
  }
  const pem = text.trim();
  if (!pem.startsWith('-----BEGIN PUBLIC KEY-----') || !pem.endsWith('-----END PUBLIC KEY-----')) {
    throw new Error('expected a PEM public key (-----BEGIN PUBLIC KEY-----) or 130 hex digits');
  }
  const jwk = createPublicKey({ key: pem, format: 'pem', type: 'spki' }).export({ format: 'jwk' });
  if (jwk.kty !== 'EC' || jwk.crv !== 'P-256' || !jwk.x || !jwk.y) throw new Error('vault key is not a P-256 public key');
  const x = fromB64(jwk.x);
  const y = fromB64(jwk.y);
  if (!x || !y || x.length !== 32 || y.length !== 32) throw new Error('vault key has malformed coordinates');
  const out = new Uint8Array(65);
  out[0] = 0x04;
  out.set(x, 1);
  out.set(y, 33);
  return out;
}

export function readVaultKey(path: string): Uint8Array {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw usage(`cannot read vault key ${path}: ${(e as NodeJS.ErrnoException).code ?? 'read error'}`);
  }
  try {
    return parseVaultKey(text);
  } catch (e) {
    throw usage(`cannot use vault key ${path}: ${e instanceof Error ? e.message : 'invalid'}`);
  }
}

// ---- I/O seams (so tests can run main in-process) ---------------------------------------

export interface CliIo {
  stdin: NodeJS.ReadableStream & { isTTY?: boolean; setRawMode?: (raw: boolean) => unknown };
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown; isTTY?: boolean; columns?: number };
  env: Record<string, string | undefined>;
}

/** First line of stdin, without its line ending. Only reads up to that line. */
async function readLine(stdin: CliIo['stdin']): Promise<string> {
  const dec = new TextDecoder();
  let buf = '';
  for await (const chunk of stdin as AsyncIterable<Uint8Array | string>) {
    buf += typeof chunk === 'string' ? chunk : dec.decode(chunk, { stream: true });
    const nl = buf.indexOf('\n');
    if (nl >= 0) return buf.slice(0, nl).replace(/\r$/, '');
    if (buf.length > 64 * 1024) break;
  }
  return buf.replace(/\r?\n?$/, '');
}

/** On a terminal: prompt on stderr and read without echo (raw mode). */
function promptHidden(io: CliIo, prompt: string): Promise<string> {
  const stdin = io.stdin as NodeJS.ReadStream;
  io.stderr.write(prompt);
  return new Promise((resolve, reject) => {
    let s = '';
    const done = (err?: Error) => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      io.stderr.write('\n');
      if (err) reject(err);
      else resolve(s);
    };
    const onData = (d: Buffer) => {
      for (const ch of d.toString('utf8')) {
        if (ch === '\r' || ch === '\n' || ch === '\u0004') return done();
        if (ch === '\u0003') return done(new CliError(ExitCodes.OTHER, 'cancelled'));
        if (ch === '\u007f' || ch === '\b') s = [...s].slice(0, -1).join('');
        else s += ch;
      }
    };
    stdin.setRawMode(true);
    stdin.resume();
    stdin.on('data', onData);
  });
}

async function readSecretLine(io: CliIo, prompt: string, what: string): Promise<string> {
  const tty = io.stdin.isTTY && typeof io.stdin.setRawMode === 'function';
  const s = tty ? await promptHidden(io, prompt) : await readLine(io.stdin);
  if (!s) throw usage(`no ${what} on stdin (expected it as the first line)`);
  return s;
}

/** Enrolling types the password once for good: on a terminal, ask twice. */
async function readNewPassword(io: CliIo): Promise<string> {
  const pw = await readSecretLine(io, 'New vault password: ', 'password');
  if (io.stdin.isTTY && typeof io.stdin.setRawMode === 'function') {
    if ((await promptHidden(io, 'Repeat password: ')) !== pw) throw usage('the passwords do not match');
  }
  return pw;
}

// ---- progress -----------------------------------------------------------------------------

/** Counts bytes through a pipeline; draws a bar on a terminal for files over 4 MiB. */
function progress(io: CliIo, total: number, label: string): TransformStream<Uint8Array, Uint8Array> {
  const draw = total > PROGRESS_MIN_BYTES && io.stderr.isTTY === true;
  let seen = 0;
  let last = 0;
  const mib = (n: number) => (n / 1048576).toFixed(1);
  const render = () => {
    const width = Math.max(10, Math.min(40, (io.stderr.columns ?? 80) - 40));
    const frac = Math.min(1, seen / total);
    const bar = '#'.repeat(Math.round(frac * width)).padEnd(width, '.');
    io.stderr.write(`\r${label} [${bar}] ${(frac * 100).toFixed(0).padStart(3)}% ${mib(seen)}/${mib(total)} MiB`);
  };
  return new TransformStream({
    transform(chunk, controller) {
      seen += chunk.length;
      if (draw && Date.now() - last > 100) {
        last = Date.now();
        render();
      }
      controller.enqueue(chunk);
    },
    flush() {
      if (draw) {
        render();
        io.stderr.write('\n');
      }
    },
  });
}

// ---- files --------------------------------------------------------------------------------

async function inputSize(path: string): Promise<number> {
  try {
    const s = await stat(path);
    if (!s.isFile()) throw usage(`${path} is not a regular file`);
    return s.size;
  } catch (e) {
    if (e instanceof CliError) throw e;
    throw new CliError(ExitCodes.OTHER, `cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? 'error'}`);
  }
}

async function checkOutput(path: string, force: boolean): Promise<void> {
  // lstat: a link at OUT (even one pointing nowhere) is something there too. With --force the
  // final rename replaces the link itself; nothing is ever written to where it points.
  const exists = await lstat(path).then(
    () => true,
    () => false,
  );
  if (exists && !force) throw usage(`${path} already exists (pass --force to overwrite)`);
}

/**
 * in → transform → a new temporary file beside OUT, fsync'd, then renamed over
 * OUT. The temporary file is created with O_CREAT|O_EXCL|O_NOFOLLOW, mode
 * 0600, under a random name (lib/safe-file.ts): nothing planted can be
 * written through, and whatever fails removes it. Node streams wrapped as Web
 * Streams keep memory flat: pipeTo honours backpressure.
 */
async function pipeFile(
  inPath: string,
  outPath: string,
  through: (src: ReadableStream<Uint8Array>) => ReadableStream<Uint8Array>,
): Promise<void> {
  let tmp: { fd: number; path: string };
  try {
    tmp = createTemp(outPath);
  } catch (e) {
    throw new CliError(ExitCodes.OTHER, `cannot create a file beside ${outPath}: ${(e as NodeJS.ErrnoException).code ?? 'error'}`);
  }
  inProgress.add(tmp.path);
  try {
    const src = Readable.toWeb(createReadStream(inPath)) as unknown as ReadableStream<Uint8Array>;
    const dst = Writable.toWeb(createWriteStream(tmp.path, { fd: tmp.fd, flush: true })) as unknown as WritableStream<Uint8Array>;
    await through(src).pipeTo(dst);
    await rename(tmp.path, outPath);
  } catch (e) {
    await unlink(tmp.path).catch(() => {});
    throw e;
  } finally {
    inProgress.delete(tmp.path);
  }
}

/** Temporary outputs being written, removed if the process is interrupted (see the bottom of the file). */
const inProgress = new Set<string>();

/** Parse the header before spending a password attempt on a file that cannot be restored anyway. */
async function checkBackupHeader(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    const buf = new Uint8Array(HEADER_LENGTH);
    const { bytesRead } = await fh.read(buf, 0, HEADER_LENGTH, 0);
    readBackupHeader(buf.subarray(0, bytesRead));
  } catch (e) {
    throw backupFileError(e, 'wrong backup key');
  } finally {
    await fh.close();
  }
}

// ---- vault connection ---------------------------------------------------------------------

interface ConnOpts {
  vault?: string;
  token?: string;
  vaultKey?: string;
  namespace?: string;
}

function connect(o: ConnOpts, io: CliIo): { client: VaultClient; close(): void } {
  const urls = vaultUrls(o.vault, io.env.BKV_VAULT);
  const token = o.token ?? io.env.BKV_TOKEN;
  const keyPath = o.vaultKey ?? io.env.BKV_VAULT_KEY;
  if (!keyPath) throw usage('no vault key: pass --vault-key FILE or set BKV_VAULT_KEY (the daemon writes <data>/vault-key.pub)');
  if (!token) throw usage('no tenant token: pass --token or set BKV_TOKEN');
  const pinnedKey = readVaultKey(keyPath);
  const transports = urls.map((url) => new WebSocketTransport({ url, token }));
  const kdf = kdfFromEnv(io.env.BKV_KDF);
  // Another tenant's record namespace, if the vault grants it to this token's tenant (docs/RPC.md#namespaces).
  const namespace = o.namespace ?? (io.env.BKV_NAMESPACE || undefined);
  // Several URLs are the nodes of one vault, tried in the order given (like libpq's host lists): the first
  // that answers serves, a failing one hands over to the next (docs/RPC.md#fail-over).
  const client = new VaultClient({ transports, pinnedKey, failover: { first: 0 }, ...(kdf ? { kdf } : {}), ...(namespace ? { namespace } : {}) });
  return { client, close: () => client.close() };
}

/**
 * --vault, else BKV_VAULT, else the default: one URL or several comma-separated
 * (`ws://a:8787,ws://b:8787`). A bad entry is a usage error naming where it came
 * from and which entry it is.
 */
export function vaultUrls(flag: string | undefined, env: string | undefined): string[] {
  const [text, source] = flag !== undefined ? [flag, '--vault'] : env !== undefined ? [env, 'BKV_VAULT'] : [DEFAULT_VAULT, 'default vault URL'];
  try {
    return parseVaultUrls(text, source);
  } catch (e) {
    throw usage(messageFor(e));
  }
}

/**
 * BKV_KDF='{"m":65536,"t":3,"p":4}' overrides the Argon2id parameters of new
 * enrolments (default DEFAULT_KDF; never below the vault's floor either way).
 */
export function kdfFromEnv(text: string | undefined): KdfParams | undefined {
  if (text === undefined || text.trim() === '') return undefined;
  try {
    return checkKdfParams({ alg: 'argon2id', ...JSON.parse(text) }, { alg: 'argon2id', m: 8, t: 1, p: 1 });
  } catch {
    throw usage('BKV_KDF must be JSON like {"m":65536,"t":3,"p":4} (Argon2id memory KiB, passes, lanes)');
  }
}

function addConnOptions(cmd: Command): Command {
  return cmd
    .option('--vault <urls>', `vault WebSocket URL, or the nodes of one vault comma-separated, tried in order (env BKV_VAULT, default ${DEFAULT_VAULT})`)
    .option('--token <jwt>', 'tenant token (env BKV_TOKEN; prefer the env var: arguments show in process lists)')
    .option('--vault-key <file>', "the vault's public key to pin: PEM <data>/vault-key.pub or 130 hex digits (env BKV_VAULT_KEY)")
    .option('--namespace <name>', "record namespace, if not the tenant's own; the vault must grant it (env BKV_NAMESPACE)");
}

const CREATE_HELP = `
Key:
  --user ID --password-stdin   The password is the first line of stdin. If the user has an active
                               vault record, the password recovers their key and it is reused
                               (wrong password: exit 3, with the attempts left). Otherwise a new
                               key is generated and enrolled under this password.
  --print-key                  No vault. A new key is printed to stdout as a 64-digit code:
                               write it down, it is the only way to restore.
The file is streamed (memory stays flat for any size) into a new private file beside OUT,
renamed to OUT on success; a link or file planted beside OUT is never written through.
Progress is shown on stderr for files over 4 MiB when stderr is a terminal.
`;

const RESTORE_HELP = `
Key:
  --user ID --password-stdin   Recover the escrowed key with the password (first line of stdin).
                               Each wrong password spends one of the record's attempts; when
                               they run out the record is locked and the key destroyed.
  --key CODE | --key-stdin     The 64-digit code printed by 'backup create --print-key'.
The backup's header is checked before any password is spent. OUT appears only once the whole
backup has authenticated (written to a new private file beside it, then renamed); a failed
restore leaves nothing behind.
`;

const EXIT_HELP = `
Exit codes:
  0 ok                          5 no record for this user
  1 any other error             6 vault unreachable or unavailable
  2 usage error                 7 wrong 64-digit code or wrong key
  3 wrong password (N left)     8 backup corrupted, truncated or not a backup
  4 record locked               9 unauthenticated (bad or expired token)

Environment:
  BKV_VAULT, BKV_TOKEN, BKV_VAULT_KEY   defaults for --vault, --token, --vault-key
  BKV_VAULT=ws://a:8787,ws://b:8787     several nodes of one vault: a node that fails hands over to the next
  BKV_KDF   Argon2id for new enrolments as JSON, e.g. {"m":65536,"t":3,"p":4} (raised to the vault's floor)
  BKV_NAMESPACE   default for --namespace (another tenant's records, where the vault grants it)`;

// ---- commands -------------------------------------------------------------------------------

interface CreateOpts extends ConnOpts {
  in: string;
  out: string;
  user?: string;
  passwordStdin?: boolean;
  printKey?: boolean;
  force?: boolean;
}

async function backupCreate(o: CreateOpts, io: CliIo): Promise<void> {
  if (o.printKey && (o.user !== undefined || o.passwordStdin)) throw usage('--print-key cannot be combined with --user/--password-stdin');
  if (!o.printKey && (o.user === undefined || !o.passwordStdin)) {
    throw usage('pass --user ID --password-stdin (key escrowed in the vault) or --print-key (write the code down yourself)');
  }
  const size = await inputSize(o.in);
  await checkOutput(o.out, !!o.force);
  let key: Uint8Array;
  if (o.printKey) {
    key = generateBackupKey();
    // Shown before encrypting: a code without a backup is harmless, a backup without its code is lost.
    io.stdout.write(`${formatKeyCode(key)}\n`);
  } else {
    key = await escrowedKey(o, io);
  }
  try {
    await pipeFile(o.in, o.out, (src) => sealBackup(src.pipeThrough(progress(io, size, 'encrypting')), key));
  } finally {
    key.fill(0);
  }
}

/** Reuse the user's escrowed key if there is one (one key for all their backups), else enrol a new one. */
async function escrowedKey(o: CreateOpts, io: CliIo): Promise<Uint8Array> {
  const { client, close } = connect(o, io);
  try {
    const st = await client.status(o.user!);
    if (st.state === 'active') return await client.recoverWithPassword(o.user!, await readSecretLine(io, 'Vault password: ', 'password'));
    const password = await readNewPassword(io);
    if (st.state === 'locked') {
      io.stderr.write('bkv: note: the previous record was locked; enrolling a new key (older backups need their old key)\n');
    }
    const key = generateBackupKey();
    await client.enrollPassword(o.user!, password, key);
    return key;
  } finally {
    close();
  }
}

interface RestoreOpts extends ConnOpts {
  in: string;
  out: string;
  user?: string;
  passwordStdin?: boolean;
  key?: string;
  keyStdin?: boolean;
  force?: boolean;
}

async function backupRestore(o: RestoreOpts, io: CliIo): Promise<void> {
  const byPassword = o.user !== undefined || !!o.passwordStdin;
  const byCode = o.key !== undefined || !!o.keyStdin;
  if (byPassword === byCode || (byPassword && (o.user === undefined || !o.passwordStdin)) || (o.key !== undefined && o.keyStdin)) {
    throw usage('pass either --user ID --password-stdin, or --key CODE (or --key-stdin)');
  }
  const size = await inputSize(o.in);
  await checkOutput(o.out, !!o.force);
  await checkBackupHeader(o.in);
  let key: Uint8Array;
  let hint: string;
  if (byCode) {
    const text = o.key ?? (await readSecretLine(io, 'Backup code: ', 'backup code'));
    try {
      key = parseKeyCode(text);
    } catch (e) {
      throw new CliError(ExitCodes.WRONG_KEY, messageFor(e)); // counts only, never digits
    }
    hint = 'wrong backup code: this code does not open this backup';
  } else {
    const { client, close } = connect(o, io);
    try {
      key = await client.recoverWithPassword(o.user!, await readSecretLine(io, 'Vault password: ', 'password'));
    } finally {
      close();
    }
    hint = "wrong key: this user's escrowed key does not open this backup (made with another key)";
  }
  try {
    await pipeFile(o.in, o.out, (src) => openBackup(src.pipeThrough(progress(io, size, 'decrypting')), key));
  } catch (e) {
    throw backupFileError(e, hint);
  } finally {
    key.fill(0);
  }
}

async function vaultStatus(o: ConnOpts & { user: string; json?: boolean }, io: CliIo): Promise<void> {
  const { client, close } = connect(o, io);
  try {
    const s = await client.status(o.user);
    if (o.json) io.stdout.write(`${JSON.stringify(s)}\n`);
    else if (s.state === 'active') io.stdout.write(`${s.userId}: active, ${s.attemptsLeft} of ${s.attemptLimit} attempts left\n`);
    else io.stdout.write(`${s.userId}: ${s.state}\n`);
  } finally {
    close();
  }
}

async function vaultDelete(o: ConnOpts & { user: string }, io: CliIo): Promise<void> {
  const { client, close } = connect(o, io);
  try {
    await client.delete(o.user);
    io.stdout.write(`deleted the record of ${o.user}\n`);
  } finally {
    close();
  }
}

function program(io: CliIo): Command {
  const root = new Command('bkv')
    .description('Encrypted backups with the key escrowed in a Backup Key Vault behind a password.')
    .exitOverride()
    .configureOutput({
      writeOut: (s) => void io.stdout.write(s),
      writeErr: (s) => void io.stderr.write(s),
      // Commander's own usage errors, in the same one-line style as ours.
      outputError: (s, write) => write(`bkv: ${s.replace(/^error: /, '').trimEnd()}\n`),
    })
    .showSuggestionAfterError(true)
    .addHelpText('after', EXIT_HELP);

  const backup = root.command('backup').description('create and restore encrypted backup files');
  addConnOptions(
    backup
      .command('create')
      .description('encrypt a file into a BKV1 backup, with an escrowed key (--user) or a printed code (--print-key)')
      .requiredOption('--in <file>', 'file to back up')
      .requiredOption('--out <file>', 'backup to write (FILE.bkv); written beside it, renamed on success')
      .option('--user <id>', 'vault user id whose escrowed key encrypts the backup')
      .option('--password-stdin', 'read the vault password from the first line of stdin (passwords are never arguments)')
      .option('--print-key', 'do not use the vault: print a new 64-digit code instead')
      .option('--force', 'overwrite OUT if it exists'),
  )
    .addHelpText('after', CREATE_HELP + EXIT_HELP)
    .action(async (o: CreateOpts) => backupCreate(o, io));

  addConnOptions(
    backup
      .command('restore')
      .description('decrypt a BKV1 backup with the escrowed key (--user) or the 64-digit code (--key)')
      .requiredOption('--in <file>', 'backup to read (FILE.bkv)')
      .requiredOption('--out <file>', 'file to write; written beside it, renamed on success')
      .option('--user <id>', 'vault user id whose escrowed key opens the backup')
      .option('--password-stdin', 'read the vault password from the first line of stdin')
      .option('--key <code>', 'the 64-digit code (spaces and dashes ignored); visible in process lists, see --key-stdin')
      .option('--key-stdin', 'read the 64-digit code from the first line of stdin')
      .option('--force', 'overwrite OUT if it exists'),
  )
    .addHelpText('after', RESTORE_HELP + EXIT_HELP)
    .action(async (o: RestoreOpts) => backupRestore(o, io));

  const vault = root.command('vault').description('inspect or delete vault records');
  addConnOptions(
    vault
      .command('status')
      .description("show a user's record: absent, active (with attempts left), locked or deleted; exit 0 in every state")
      .requiredOption('--user <id>', 'vault user id')
      .option('--json', 'print the status as JSON'),
  )
    .addHelpText('after', EXIT_HELP)
    .action(async (o: ConnOpts & { user: string; json?: boolean }) => vaultStatus(o, io));
  addConnOptions(
    vault
      .command('delete')
      .description("delete a user's record: the escrowed key is gone for good; exit 5 if there is none")
      .requiredOption('--user <id>', 'vault user id'),
  )
    .addHelpText('after', EXIT_HELP)
    .action(async (o: ConnOpts & { user: string }) => vaultDelete(o, io));
  return root;
}

/** Run the CLI on `argv` (without node and script). Resolves to the exit code; never throws. */
export async function main(argv: string[], ioIn: Partial<CliIo> = {}): Promise<number> {
  const io: CliIo = {
    stdin: ioIn.stdin ?? process.stdin,
    stdout: ioIn.stdout ?? process.stdout,
    stderr: ioIn.stderr ?? process.stderr,
    env: ioIn.env ?? process.env,
  };
  try {
    await program(io).parseAsync(argv, { from: 'user' });
    return ExitCodes.OK;
  } catch (e) {
    // Commander already printed its own message (or the help).
    if (!(e instanceof CommanderError)) io.stderr.write(`bkv: ${messageFor(e)}\n`);
    return exitCodeFor(e);
  }
}

function runDirectly(): boolean {
  const script = process.argv[1];
  if (!script) return false;
  try {
    return import.meta.url === pathToFileURL(realpathSync(script)).href;
  } catch {
    return false;
  }
}

if (runDirectly()) {
  // Ctrl-C mid-file must not leave the temporary file behind either.
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(sig, () => {
      for (const p of inProgress) rmSync(p, { force: true });
      process.stderr.write('\nbkv: interrupted\n');
      process.exit(128 + (sig === 'SIGINT' ? 2 : sig === 'SIGTERM' ? 15 : 1));
    });
  }
  void main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
