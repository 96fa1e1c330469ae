// First-run setup shared by `bkv-admin init` and `bkv-vault serve --init`:
// the embedded SoftHSM2 token (development and tests), the key set, the
// pinned public key file and the database. Idempotent: a second run changes
// nothing and says so.
import { createPublicKey, randomBytes } from 'node:crypto';
import { existsSync, lstatSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { VaultError, ErrorCodes, isVaultError } from '../protocol/errors.js';
import { initToken, Token } from './hsm/token.js';
import { inspectModule, rememberQuirks, requireCapabilities, requireUnwrappable } from './hsm/capabilities.js';
import { openKeys, selfTest } from './core/open.js';
import { Store } from './store/index.js';
import { Vault } from './core/vault.js';
import { hsmSettings, readPin, type Config, type HsmSettings } from './config.js';
import { toHex } from '../protocol/bytes.js';
import type { TokenConfig } from './hsm/token.js';
import { writeFileAtomic } from '../lib/safe-file.js';

/** Point SoftHSM at the data folder before the library is first loaded in this process. */
export function prepareEmbedded(s: HsmSettings): void {
  if (!s.embedded) return;
  mkdirSync(s.embedded.tokenDir, { recursive: true, mode: 0o700 });
  // The token directory is the HSM: a link planted in its place would put the keys elsewhere.
  if (!lstatSync(s.embedded.tokenDir).isDirectory()) {
    throw new VaultError(ErrorCodes.HSM_ERROR, `${s.embedded.tokenDir} is not a directory (a link or a file is in its place); refusing to put the token there`);
  }
  // Written when missing, and when something other than a regular file (a link) took its name.
  if (!isRegularFile(s.embedded.conf)) {
    writeFileAtomic(s.embedded.conf, `directories.tokendir = ${s.embedded.tokenDir}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n`);
  }
  process.env.SOFTHSM2_CONF = s.embedded.conf;
}

function isRegularFile(path: string): boolean {
  try {
    return lstatSync(path).isFile();
  } catch {
    return false;
  }
}

export function tokenConfig(c: Config): TokenConfig {
  const s = hsmSettings(c);
  prepareEmbedded(s);
  return { modulePath: s.modulePath, tokenLabel: s.tokenLabel, pin: readPin(s), ...(s.libraryParameters ? { libraryParameters: s.libraryParameters } : {}) };
}

function writeSecret(path: string, value: string): void {
  writeFileAtomic(path, value + '\n', 0o600);
}

/** PEM SubjectPublicKeyInfo of a raw P-256 point: the file clients pin. */
export function publicKeyPem(point: Uint8Array): string {
  const x = Buffer.from(point.subarray(1, 33)).toString('base64url');
  const y = Buffer.from(point.subarray(33, 65)).toString('base64url');
  return createPublicKey({ key: { kty: 'EC', crv: 'P-256', x, y }, format: 'jwk' }).export({ type: 'spki', format: 'pem' }) as string;
}

export interface InitResult {
  vaultId: string;
  createdToken: boolean;
  createdKeys: string[];
  publicKeyFile: string;
}

/**
 * Create the embedded SoftHSM2 token (random user and SO PINs in the data
 * folder) unless it exists or the vault uses an external module. No keys:
 * `init` makes a new vault's, the key ceremony's target-init waits for a clone's.
 */
export function ensureEmbeddedToken(c: Config, log: Logger): boolean {
  mkdirSync(c.dataDir, { recursive: true, mode: 0o700 });
  const s = hsmSettings(c);
  prepareEmbedded(s);
  if (!s.embedded || existsSync(s.pinFile)) return false;
  const pin = randomBytes(16).toString('hex');
  const soPin = randomBytes(16).toString('hex');
  try {
    initToken(s.modulePath, s.tokenLabel, soPin, pin);
  } catch (e) {
    throw new VaultError(ErrorCodes.HSM_ERROR, `could not create the embedded token: ${(e as Error).message}`);
  }
  writeSecret(s.embedded.soPinFile, soPin);
  writeSecret(s.pinFile, pin);
  log.info({ event: 'hsm.token.created', label: s.tokenLabel }, 'created embedded SoftHSM2 token');
  return true;
}

export interface InitOptions {
  /**
   * The capability check (default: inspectModule on the configured token). A seam for
   * tests of modules this machine does not have (openCryptoki, tpm2-pkcs11): they run
   * the real check on a real token that hides what those modules lack.
   */
  inspect?: typeof inspectModule;
}

export async function initVault(c: Config, log: Logger, o: InitOptions = {}): Promise<InitResult> {
  const createdToken = ensureEmbeddedToken(c, log);
  const s = hsmSettings(c);
  // Before anything is created: a module that lacks a mechanism, or lets keys out
  // wrapped without the operator's consent, leaves no half-made vault behind.
  const cfg = tokenConfig(c);
  const check = (o.inspect ?? inspectModule)(cfg, { vaultKeys: true });
  requireCapabilities(check, 'init refused');
  requireUnwrappable(check, s.acceptWrappableKeys, 'init refused');
  rememberQuirks(cfg, check.quirks);
  log.info({ event: 'hsm.capabilities', quirks: check.quirks, wrappable: check.wrap.wrappable }, 'HSM capability check passed');
  const keys = openKeys({ ...cfg, quirks: check.quirks }, true, log);
  try {
    await selfTest(keys);
    const publicKeyFile = join(c.dataDir, 'vault-key.pub');
    writeFileAtomic(publicKeyFile, publicKeyPem(keys.signingPublic));
    const store = new Store(c.dbPath ?? join(c.dataDir, 'vault.db'));
    try {
      const vault = await Vault.open(keys, store, log);
      return { vaultId: toHex(vault.vaultId), createdToken, createdKeys: keys.created, publicKeyFile };
    } finally {
      store.close();
    }
  } finally {
    await keys.close();
  }
}

/** True when the configured token exists and the PIN opens it. */
export function tokenReady(c: Config): boolean {
  try {
    Token.open(tokenConfig(c)).close();
    return true;
  } catch (e) {
    if (isVaultError(e, ErrorCodes.HSM_TOKEN_NOT_FOUND) || isVaultError(e, ErrorCodes.BAD_REQUEST)) return false;
    throw e;
  }
}
