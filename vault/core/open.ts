// Start-up: open the token, hold its keys to the policy, self-test them, open
// the database, and hand back a ready Vault. The only place that wires hsm/,
// hsm-policy/ and store/ together.
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../errors.js';
import { Token, type TokenConfig } from '../hsm/token.js';
import { TokenVaultKeys, type VaultKeys } from '../hsm/vault-keys.js';
import { enforcePolicy } from '../../hsm-policy/enforce.js';
import { Store } from '../store/index.js';
import { Vault, type VaultOptions } from './vault.js';

export interface OpenOptions {
  hsm: TokenConfig;
  dbPath: string;
  /** Create missing keys (bkv-admin init). A serving vault never does. */
  createKeys?: boolean;
  vault?: Partial<VaultOptions>;
  log: Logger;
}

export function openKeys(hsm: TokenConfig, createKeys: boolean, log: Logger): TokenVaultKeys {
  const token = Token.open(hsm);
  try {
    const keys = enforcePolicy(token, { create: createKeys });
    if (keys.created.length) log.info({ event: 'hsm.keys.created', labels: keys.created }, 'created vault keys on the token');
    return new TokenVaultKeys(token, keys, keys.created);
  } catch (e) {
    token.close();
    throw e;
  }
}

/** Round-trip every key once so a broken token fails at start, not on a user's recovery. */
export async function selfTest(keys: VaultKeys): Promise<void> {
  const probe = await keys.random(32);
  const mac = await keys.makeVerifier(probe);
  const epoch = keys.currentEpoch();
  const sealed = await keys.seal(epoch, probe, probe);
  const opened = await keys.unseal(epoch, probe, sealed);
  const ok =
    (await keys.checkVerifier(probe, mac)) &&
    !(await keys.checkVerifier(probe, new Uint8Array(32))) &&
    opened !== null &&
    Buffer.from(opened).equals(Buffer.from(probe)) &&
    (await keys.sign(probe)).length === 64 &&
    (await keys.oprfEvaluate(keys.channelPublic)).length === 32;
  if (!ok) throw new VaultError(ErrorCodes.HSM_ERROR, 'HSM self-test failed: a vault key does not round-trip');
}

export async function openVault(opts: OpenOptions): Promise<Vault> {
  const keys = openKeys(opts.hsm, opts.createKeys ?? false, opts.log);
  let store: Store | undefined;
  try {
    await selfTest(keys);
    store = new Store(opts.dbPath);
    return await Vault.open(keys, store, opts.log, opts.vault);
  } catch (e) {
    store?.close();
    keys.close();
    throw e;
  }
}
