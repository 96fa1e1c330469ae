// Real NSS softoken tokens (libsoftokn3.so) in temp folders, the second
// reference module next to SoftHSM2 (test/helpers/softhsm.ts).
//
// NSS's process model, and what it means for tests:
// - The module takes its configuration only as C_Initialize library parameters
//   (no config file, no environment variable), and a process initialises a
//   module once: the first C_Initialize wins until C_Finalize.
// - Each NSS database (cert9.db + key4.db in one folder) is one token. Its
//   label is not stored in the database but given by the parameters
//   (tokenDescription / dbTokenDescription), at most 32 characters.
// - Several databases can live in one process as extra slots (ids 4..100).
//   A C_Finalize drops slots added at run time, so this helper declares them
//   all up front: every token of one test process carries the SAME
//   `libraryParameters`, a string that names slot 1 (NSS's crypto slot) and
//   MAX_TOKENS database slots under one process folder. Slots whose database
//   does not exist yet appear as empty write-protected tokens (`forceOpen`);
//   makeNssToken() creates the database (certutil -N sets the user PIN) and,
//   when the library is already up in this process, loads it into its slot
//   with NSS's own CKO_NSS_NEWSLOT object (what NSS's SECMOD_OpenUserDB does).
//   So whoever initialises the library (the vault, a worker thread, a recycle
//   after C_Finalize) sees every token made so far.
// - A separate process (the daemon) gets `standaloneParameters`: that one
//   database as NSS's usual key slot (slot 2), nothing else. Two processes may
//   open the same NSS sql database (SQLite locking), unlike a SoftHSM token,
//   but tests should still give each daemon a token of its own.
// - NSS has no SO PIN once the user PIN is set (the SO logs in only with an
//   empty PIN on a database without a password), so `soPin` is absent.
// - NSS refuses a process that forked after C_Initialize; spawn (fork+exec)
//   is fine.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import pkcs11js from 'pkcs11js';

const P = pkcs11js;

/** NSS vendor values (nss/lib/util/pkcs11n.h): the pseudo object that (re)loads a database slot. */
const CKO_NSS_NEWSLOT = 0xce534355;
const CKA_NSS_MODULE_SPEC = 0xce534368;
/** NSS's crypto-only slot; only a session on it may create CKO_NSS_NEWSLOT. */
const NSS_CRYPTO_SLOT = 1n;
/** First user database slot id NSS accepts (SFTK_MIN_USER_SLOT_ID); the last is 100. */
const FIRST_SLOT = 4;

const MULTIARCH: Record<string, string> = {
  x64: 'x86_64-linux-gnu',
  arm64: 'aarch64-linux-gnu',
  arm: 'arm-linux-gnueabihf',
  ppc64: 'powerpc64le-linux-gnu',
  s390x: 's390x-linux-gnu',
  riscv64: 'riscv64-linux-gnu',
};

/**
 * Path of NSS's softoken. BKV_NSS_MODULE overrides; otherwise the multiarch
 * folders Debian uses (older releases put it under nss/), the lib64 folders of
 * other distributions, then the dynamic linker's cache.
 */
export function nssModulePath(): string {
  const override = process.env.BKV_NSS_MODULE;
  if (override) {
    if (!existsSync(override)) throw new Error(`BKV_NSS_MODULE=${override} does not exist`);
    return override;
  }
  const triplet = MULTIARCH[process.arch];
  const candidates = [
    ...(triplet ? [`/usr/lib/${triplet}/libsoftokn3.so`, `/usr/lib/${triplet}/nss/libsoftokn3.so`] : []),
    '/usr/lib64/libsoftokn3.so',
    '/usr/lib64/nss/libsoftokn3.so',
    '/usr/lib/libsoftokn3.so',
    '/usr/lib/nss/libsoftokn3.so',
  ];
  const found = candidates.find((p) => existsSync(p));
  if (found) return found;
  try {
    const cache = execFileSync('ldconfig', ['-p'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    const m = /libsoftokn3\.so\b.*=>\s*(\S+)/.exec(cache);
    if (m?.[1] && existsSync(m[1])) return m[1];
  } catch {
    /* no ldconfig: fall through */
  }
  throw new Error('NSS softoken (libsoftokn3.so) not found: run scripts/setup (Debian packages libnss3, libnss3-tools)');
}

export interface NssTestToken {
  modulePath: string;
  /** C_Initialize library parameters for THIS process: the same string for every token of the process. */
  libraryParameters: string;
  /** Parameters for a separate process (the daemon) that should see this token alone, as NSS's key slot. */
  standaloneParameters: string;
  /** Token label (CKA of C_GetTokenInfo), as TestToken calls it. */
  label: string;
  /** The same label, as TokenConfig calls it. */
  tokenLabel: string;
  pin: string;
  /** NSS has no SO PIN once the user PIN is set. */
  soPin?: undefined;
  /** The NSS database folder (cert9.db, key4.db). */
  dir: string;
  /** Slot id the token has under `libraryParameters`. */
  slotId: number;
  /** Environment for a child process (NSS needs nothing beyond its parameters). */
  env: NodeJS.ProcessEnv;
  /** Delete the database; in this process the slot turns empty and its sessions end. */
  cleanup(): void;
}

interface ProcessNss {
  root: string;
  modulePath: string;
  prefix: string;
  max: number;
  parameters: string;
  next: number;
  /** Tokens made and not yet cleaned up. */
  live: number;
  p11?: pkcs11js.PKCS11;
}

let state: ProcessNss | undefined;

// Quotes, brackets and spaces would end a value early in NSS's parameter syntax.
function checkPath(p: string): string {
  if (/['"\s<>[\]]/.test(p)) throw new Error(`NSS test folder path "${p}" has a character NSS parameters cannot carry`);
  return p;
}

const slotLabel = (s: ProcessNss, i: number): string => `bkv-nss-${s.prefix}-${String(i).padStart(2, '0')}`;
const slotDir = (s: ProcessNss, i: number): string => join(s.root, `t${String(i).padStart(2, '0')}`);
const slotSpec = (s: ProcessNss, i: number): string =>
  `0x${(FIRST_SLOT + i).toString(16)}=[configdir='sql:${slotDir(s, i)}' certPrefix='' keyPrefix='' ` +
  `tokenDescription='${slotLabel(s, i)}' slotDescription='${slotLabel(s, i)}' flags=forceOpen]`;

function processNss(): ProcessNss {
  if (state) return state;
  const modulePath = nssModulePath();
  const root = checkPath(mkdtempSync(join(tmpdir(), 'bkv-nss-')));
  // 64 by default: test/integration/rollback.test.ts, the busiest file, makes 16 today. NSS allows ids 4..100.
  const max = Math.min(97, Math.max(1, Number(process.env.BKV_NSS_TOKENS ?? 64) || 64));
  const s: ProcessNss = { root, modulePath, prefix: randomBytes(4).toString('hex'), max, parameters: '', next: 0, live: 0 };
  const slots = Array.from({ length: max }, (_, i) => slotSpec(s, i)).join(' ');
  s.parameters =
    `configdir='sql:${root}' certPrefix='' keyPrefix='' secmod='secmod.db' flags= ` +
    `tokens=<0x01=[flags=noCertDB,noKeyDB] ${slots}>`;
  // Also removed when the last token is cleaned up: a test worker can end without 'exit'.
  process.once('exit', () => rmSync(root, { recursive: true, force: true }));
  return (state = s);
}

/** The library parameters every NSS token of this process shares (initialises nothing). */
export function nssLibraryParameters(): string {
  return processNss().parameters;
}

// The helper's own handle on the (process-wide) module: dlopen gives every
// pkcs11js instance the same library state. It never calls C_Initialize or
// C_Finalize, so it neither starts nor ends anybody's library.
function library(s: ProcessNss): pkcs11js.PKCS11 {
  if (!s.p11) {
    const p11 = new P.PKCS11();
    p11.load(s.modulePath);
    s.p11 = p11;
  }
  return s.p11;
}

// NSS answers C_GetInfo and C_GetSlotList (with no slots) even before C_Initialize,
// so "is the library up" is "does it list a slot": an initialised NSS always has one.
function initialised(p11: pkcs11js.PKCS11): boolean {
  return p11.C_GetSlotList(false).length > 0;
}

function slotHandle(p11: pkcs11js.PKCS11, id: bigint): Buffer | undefined {
  return p11.C_GetSlotList(false).find((h) => h.readBigUInt64LE(0) === id);
}

/** Send a slot pseudo object on a session of slot `via`. NSS wants the spec NUL-terminated. */
function slotOp(p11: pkcs11js.PKCS11, via: bigint, cls: number, spec: string): void {
  const slot = slotHandle(p11, via);
  if (!slot) throw new Error(`NSS slot ${via} is not there`);
  const s = p11.C_OpenSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION);
  try {
    p11.C_CreateObject(s, [
      { type: P.CKA_CLASS, value: cls },
      { type: CKA_NSS_MODULE_SPEC, value: Buffer.from(`${spec}\0`) },
    ]);
  } finally {
    p11.C_CloseSession(s);
  }
}

/**
 * A fresh NSS database with a random user PIN, as the next token slot of this
 * process. Throws once the process has used all its slots (BKV_NSS_TOKENS).
 */
export function makeNssToken(): NssTestToken {
  const s = processNss();
  if (s.next >= s.max) {
    throw new Error(`this test process already made ${s.max} NSS tokens (BKV_NSS_TOKENS raises the limit, at most 97)`);
  }
  const i = s.next++;
  const dir = slotDir(s, i);
  const label = slotLabel(s, i);
  const pin = randomBytes(6).toString('hex');
  mkdirSync(s.root, { recursive: true });
  mkdirSync(dir);
  // certutil sets the PIN from a file; the file lives only as long as the call.
  const pwFile = join(s.root, `.pw-${i}`);
  writeFileSync(pwFile, `${pin}\n`, { mode: 0o600 });
  try {
    execFileSync('certutil', ['-N', '-d', `sql:${dir}`, '-f', pwFile], { stdio: 'pipe' });
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    const err = e as NodeJS.ErrnoException & { stderr?: Buffer };
    if (err.code === 'ENOENT') throw new Error('certutil not found: run scripts/setup (Debian package libnss3-tools)');
    throw new Error(`certutil -N failed: ${err.stderr?.toString().trim() ?? err.message}`);
  } finally {
    rmSync(pwFile, { force: true });
  }
  s.live++;
  const slotId = FIRST_SLOT + i;
  // Already up in this process: the slot was opened empty, load the new database into it.
  const p11 = library(s);
  if (initialised(p11)) slotOp(p11, NSS_CRYPTO_SLOT, CKO_NSS_NEWSLOT, `tokens=<${slotSpec(s, i)}>`);
  return {
    modulePath: s.modulePath,
    libraryParameters: s.parameters,
    standaloneParameters: `configdir='sql:${dir}' certPrefix='' keyPrefix='' secmod='secmod.db' flags= dbTokenDescription='${label}'`,
    label,
    tokenLabel: label,
    pin,
    dir,
    slotId,
    env: { ...process.env },
    cleanup: () => {
      if (!existsSync(dir)) return;
      rmSync(dir, { recursive: true, force: true });
      // The process folder holds nothing else; NSS needs only the token folders (forceOpen).
      if (--s.live === 0) rmSync(s.root, { recursive: true, force: true });
      // When the library is up, reload the slot from the now missing folder: NSS closes
      // its sessions and shows the slot empty again, as after a fresh C_Initialize. A
      // DELSLOT would be worse: C_GetSlotList(true) keeps listing a deleted slot and
      // C_GetTokenInfo on it fails (CKR_SLOT_ID_INVALID), which breaks a find-by-label.
      try {
        if (initialised(p11)) slotOp(p11, NSS_CRYPTO_SLOT, CKO_NSS_NEWSLOT, `tokens=<${slotSpec(s, i)}>`);
      } catch {
        /* library going down under us: the next C_Initialize shows the slot empty anyway */
      }
    },
  };
}
