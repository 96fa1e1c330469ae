// What binds a record's verifier and seal to where it is stored. Binding
// version 1 (protocol/record.ts) names the user id only; it is kept for the
// legacy namespace, so records enrolled before namespaces still verify and
// open. Binding version 2 also names the namespace, under its own domain
// separation strings: a verifier or sealed envelope copied from one
// namespace's row to another's (same user id, same generation) fails C_Verify
// and AES-GCM. The client never computes either, so this stays vault-side and
// the protocol's pinned DSTs (test/vectors) are unchanged.
import { frame, u32be, u64be, utf8 } from '../../protocol/bytes.js';
import { sealAad as sealAadV1, verifierInput as verifierInputV1 } from '../../protocol/record.js';
import { LEGACY_NAMESPACE, parseRecordKey } from './namespace.js';

const DST_VERIFIER_NS = 'bkv-v1-verifier-ns';
const DST_SEAL_NS = 'bkv-v1-seal-ns';

/** 1 for the legacy namespace, 2 for every other. */
export const bindingVersion = (namespace: string): 1 | 2 => (namespace === LEGACY_NAMESPACE ? 1 : 2);

/** HMAC input of the verifier of the record stored under `key` (core/namespace.ts). */
export function verifierInput(vaultId: Uint8Array, key: string, generation: number, authKey: Uint8Array): Uint8Array {
  const { namespace, userId } = parseRecordKey(key);
  if (bindingVersion(namespace) === 1) return verifierInputV1(vaultId, userId, generation, authKey);
  return frame(DST_VERIFIER_NS, vaultId, utf8(namespace), utf8(userId), u64be(generation), authKey);
}

/** AES-GCM associated data of the sealed envelope of the record stored under `key`. */
export function sealAad(vaultId: Uint8Array, key: string, generation: number, epoch: number, verifier: Uint8Array): Uint8Array {
  const { namespace, userId } = parseRecordKey(key);
  if (bindingVersion(namespace) === 1) return sealAadV1(vaultId, userId, generation, epoch, verifier);
  return frame(DST_SEAL_NS, vaultId, utf8(namespace), utf8(userId), u64be(generation), u32be(epoch), verifier);
}
