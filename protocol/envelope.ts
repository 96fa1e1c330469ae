// The envelope: the backup key K encrypted under the client's envKey. The vault
// stores it (sealed again under an HSM key) but can never open it.
import { VaultError, ErrorCodes } from './errors.js';
import { concat, frame, utf8 } from './bytes.js';
import { DST, SIZES } from './suite.js';

const subtle = globalThis.crypto.subtle;

export function envelopeAad(vaultId: Uint8Array, userId: string): Uint8Array {
  return frame(DST.envelope, vaultId, utf8(userId));
}

async function gcmKey(raw: Uint8Array, usage: 'encrypt' | 'decrypt'): Promise<CryptoKey> {
  return subtle.importKey('raw', raw as BufferSource, 'AES-GCM', false, [usage]);
}

/** nonce(12) ‖ AES-256-GCM(envKey, K) ‖ tag(16). `nonce` is random unless a test vector fixes it. */
export async function sealEnvelope(
  envKey: Uint8Array,
  backupKey: Uint8Array,
  vaultId: Uint8Array,
  userId: string,
  nonce: Uint8Array = globalThis.crypto.getRandomValues(new Uint8Array(SIZES.gcmNonce)),
): Promise<Uint8Array> {
  if (backupKey.length !== SIZES.key) throw new RangeError('backup key must be 32 bytes');
  const ct = await subtle.encrypt(
    { name: 'AES-GCM', iv: nonce as BufferSource, additionalData: envelopeAad(vaultId, userId) as BufferSource, tagLength: 128 },
    await gcmKey(envKey, 'encrypt'),
    backupKey as BufferSource,
  );
  return concat(nonce, new Uint8Array(ct));
}

export async function openEnvelope(
  envKey: Uint8Array,
  envelope: Uint8Array,
  vaultId: Uint8Array,
  userId: string,
): Promise<Uint8Array> {
  if (envelope.length !== SIZES.envelope) {
    throw new VaultError(ErrorCodes.INVALID_LENGTH, `envelope must be ${SIZES.envelope} bytes`);
  }
  try {
    const pt = await subtle.decrypt(
      {
        name: 'AES-GCM',
        iv: envelope.subarray(0, SIZES.gcmNonce) as BufferSource,
        additionalData: envelopeAad(vaultId, userId) as BufferSource,
        tagLength: 128,
      },
      await gcmKey(envKey, 'decrypt'),
      envelope.subarray(SIZES.gcmNonce) as BufferSource,
    );
    return new Uint8Array(pt);
  } catch {
    throw new VaultError(ErrorCodes.DECRYPT_FAILED, 'envelope does not open with this key');
  }
}
