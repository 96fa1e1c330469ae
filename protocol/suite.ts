// The domain-separation strings of protocol version 1, except the channel's
// (CHANNEL_DST in channel.ts) and the vault-internal state hash's (state-hash.ts).
// Changing any of them is a protocol version change: the test vectors pin them.

export const PROTOCOL_VERSION = 1;

export const DST = {
  /** RFC 9380 hash_to_curve DST for the OPRF input (suite P256_XMD:SHA-256_SSWU_RO_). */
  hashToCurve: 'bkv-v1-OPRF-P256_XMD:SHA-256_SSWU_RO_',
  oprfInput: 'bkv-v1-oprf-input',
  oprfFinalize: 'bkv-v1-oprf-finalize',
  argon2Salt: 'bkv-v1-argon2id-salt',
  rwd: 'bkv-v1-rwd',
  authKey: 'bkv-v1-auth-key',
  envKey: 'bkv-v1-envelope-key',
  envelope: 'bkv-v1-envelope',
  verifier: 'bkv-v1-verifier',
  seal: 'bkv-v1-seal',
  descriptor: 'bkv-v1-descriptor',
  vaultId: 'bkv-v1-vault-id',
  tenantSecret: 'bkv-v1-tenant-secret',
} as const;

export const SIZES = {
  point: 65,
  x: 32,
  key: 32,
  authKey: 32,
  gcmNonce: 12,
  gcmTag: 16,
  /** nonce ‖ AES-GCM(K) ‖ tag */
  envelope: 12 + 32 + 16,
  verifier: 32,
  maxUserIdBytes: 128,
  maxPasswordBytes: 1024,
} as const;
