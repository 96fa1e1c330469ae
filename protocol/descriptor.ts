// The vault descriptor: the vault's channel key and limits, signed by the HSM
// `sig` key whose public half clients pin. A client talks to a vault only after
// this signature checks out against its pinned key.
import { p256 } from '@noble/curves/nist.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { VaultError, ErrorCodes } from './errors.js';
import { concat, frame, u32be, utf8 } from './bytes.js';
import { DST, PROTOCOL_VERSION } from './suite.js';
import type { KdfParams } from './kdf.js';

export interface Descriptor {
  version: number;
  vaultId: Uint8Array;
  /** P-256 public key (65 bytes) of the HSM `kx` key: the channel's vault end. */
  channelKey: Uint8Array;
  epoch: number;
  attemptLimit: number;
  kdfFloor: KdfParams;
}

export interface SignedDescriptor extends Descriptor {
  /** ECDSA P-256 over SHA-256(descriptorBytes), raw r‖s. */
  signature: Uint8Array;
}

/** 16-byte vault id: a hash of the pinned signing key, so it cannot be claimed by another key. */
export function vaultIdOf(signingKey: Uint8Array): Uint8Array {
  return sha256(frame(DST.vaultId, signingKey)).slice(0, 16);
}

export function descriptorBytes(d: Descriptor): Uint8Array {
  return frame(
    DST.descriptor,
    u32be(d.version),
    d.vaultId,
    d.channelKey,
    u32be(d.epoch),
    u32be(d.attemptLimit),
    concat(utf8(d.kdfFloor.alg), u32be(d.kdfFloor.m), u32be(d.kdfFloor.t), u32be(d.kdfFloor.p)),
  );
}

export const descriptorDigest = (d: Descriptor): Uint8Array => sha256(descriptorBytes(d));

/** Client side: accept a descriptor only if the pinned key signed it and it names that key's vault. */
export function verifyDescriptor(d: SignedDescriptor, pinnedKey: Uint8Array): Descriptor {
  const id = vaultIdOf(pinnedKey);
  const ok =
    d.version === PROTOCOL_VERSION &&
    p256.verify(d.signature, descriptorDigest(d), pinnedKey, { prehash: false, format: 'compact', lowS: false }) &&
    d.vaultId.length === id.length &&
    id.every((b, i) => b === d.vaultId[i]);
  if (!ok) throw new VaultError(ErrorCodes.FORBIDDEN, 'vault descriptor is not signed by the pinned vault key');
  return d;
}
