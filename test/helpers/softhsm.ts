// Real SoftHSM2 tokens in temp folders. SoftHSM reads SOFTHSM2_CONF once, at
// C_Initialize, so each test process gets one private token directory (made on
// first use) and every token of that process lives in it under its own label.
// Child processes (the daemon) get the same directory through `conf`.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { initToken } from '../../vault/hsm/token.js';
import { makeNssToken } from './nss.js';

export const SOFTHSM_MODULE =
  [
    '/usr/lib/softhsm/libsofthsm2.so',
    '/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so',
    '/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so',
  ].find((p) => existsSync(p)) ?? '/usr/lib/softhsm/libsofthsm2.so';

export interface TestToken {
  conf: string;
  label: string;
  pin: string;
  soPin: string;
  modulePath: string;
  /** C_Initialize library parameters (NSS softoken); absent for SoftHSM2. */
  libraryParameters?: string;
  /** Which reference module made it (BKV_TEST_MODULE). */
  module: 'softhsm' | 'nss';
  /** Environment for a child process that should see this token. */
  env: NodeJS.ProcessEnv;
  cleanup(): void;
}

let processDir: { dir: string; conf: string } | undefined;

function processTokenDir(): { dir: string; conf: string } {
  if (processDir) return processDir;
  const dir = mkdtempSync(join(tmpdir(), 'bkv-hsm-'));
  mkdirSync(join(dir, 'tokens'));
  const conf = join(dir, 'softhsm2.conf');
  writeFileSync(conf, `directories.tokendir = ${join(dir, 'tokens')}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n`);
  process.env.SOFTHSM2_CONF = conf;
  process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
  return (processDir = { dir, conf });
}

/**
 * The reference module the tests run on: BKV_TEST_MODULE=nss puts makeToken()'s
 * tokens on NSS softoken (test/helpers/nss.ts) instead of SoftHSM2, so the same
 * core, RPC, rollback and adversarial-HSM tests run on both.
 */
export const TEST_MODULE: 'softhsm' | 'nss' = process.env.BKV_TEST_MODULE === 'nss' ? 'nss' : 'softhsm';

/** The TokenConfig fields of a test token (module, label, PIN and, for NSS, its library parameters). */
export const hsmOf = (t: TestToken) => ({
  modulePath: t.modulePath,
  tokenLabel: t.label,
  pin: t.pin,
  ...(t.libraryParameters ? { libraryParameters: t.libraryParameters } : {}),
});

/**
 * A fresh, initialised token with random PINs in this process's token directory,
 * on SoftHSM2, or on NSS softoken with BKV_TEST_MODULE=nss. NSS tokens have no SO
 * PIN (soPin is empty): tests of the Security Officer's steps need SoftHSM2.
 */
export function makeToken(opts: { label?: string; module?: 'softhsm' | 'nss' } = {}): TestToken {
  if ((opts.module ?? TEST_MODULE) === 'nss') {
    const n = makeNssToken();
    return { conf: n.dir, label: n.label, pin: n.pin, soPin: '', modulePath: n.modulePath, libraryParameters: n.libraryParameters, module: 'nss', env: n.env, cleanup: n.cleanup };
  }
  const { conf } = processTokenDir();
  const label = opts.label ?? `bkv-test-${randomBytes(4).toString('hex')}`;
  const pin = randomBytes(6).toString('hex');
  const soPin = randomBytes(6).toString('hex');
  const env = { ...process.env, SOFTHSM2_CONF: conf };
  // Through the loaded library: a token made by softhsm2-util while this process
  // has SoftHSM initialised would stay invisible to it until C_Finalize.
  initToken(SOFTHSM_MODULE, label, soPin, pin);
  return {
    conf,
    label,
    pin,
    soPin,
    modulePath: SOFTHSM_MODULE,
    module: 'softhsm',
    env,
    cleanup: () => {
      try {
        execFileSync('softhsm2-util', ['--delete-token', '--token', label], { env, stdio: 'pipe' });
      } catch {
        /* already gone */
      }
    },
  };
}
