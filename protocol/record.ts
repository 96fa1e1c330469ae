// What the vault feeds to its HSM keys for one record. Binding user id,
// generation and epoch into every MAC and AAD is what makes a row copied from
// another user, or from an older enrolment, useless. This is binding version 1,
// used for records of the legacy namespace; every other namespace's records also
// bind the namespace (version 2, vault-side: vault/core/binding.ts, docs/PROTOCOL.md).
import { frame, u32be, u64be, utf8 } from './bytes.js';
import { DST } from './suite.js';

/** HMAC input whose tag is the stored verifier; compared with C_Verify at recovery. */
export function verifierInput(vaultId: Uint8Array, userId: string, generation: number, authKey: Uint8Array): Uint8Array {
  return frame(DST.verifier, vaultId, utf8(userId), u64be(generation), authKey);
}

/** AES-GCM associated data for the sealed envelope at rest. */
export function sealAad(
  vaultId: Uint8Array,
  userId: string,
  generation: number,
  epoch: number,
  verifier: Uint8Array,
): Uint8Array {
  return frame(DST.seal, vaultId, utf8(userId), u64be(generation), u32be(epoch), verifier);
}
