// The sidecar's record cache and the per-call libsignal stores built on it.
//
// The wallet's SQLite file owns every record; this cache holds working copies. A call gets its
// own CallRecords: reads look at the call's own writes first, then the cache, then ask Python
// (`load`). Writes stay in the call until it succeeds; only then are they copied into the cache
// and returned as the call's `changes`. A call that fails therefore leaves the cache untouched,
// so a forged or broken message can never consume a prekey or move a ratchet.

import * as S from '@signalapp/libsignal-client';

// Kinds whose absence, once learnt from Python, is remembered. A missing prekey is asked for
// again each time, because the wallet may store a freshly generated key after a failed lookup.
const REMEMBER_ABSENT = new Set(['session', 'identity', 'verified_identity', 'kyber_used']);

// Text our own store errors carry, matched by the error classifier in sidecar.mjs.
export const MISSING_RECORD = 'tigress: no such record';
export const KYBER_REPLAY = 'tigress: last-resort kyber prekey already used with this base key';
export const LOAD_FAILED = 'tigress: record load failed';

const cacheKey = (kind, key) => `${kind}\u0000${key}`;

/** Working copies of records, plus the `load` round trip for the ones it does not hold. */
export class RecordCache {
  /** @param {(kind: string, key: string) => Promise<Uint8Array | null>} requestLoad */
  constructor(requestLoad) {
    this.requestLoad = requestLoad;
    this.records = new Map(); // cacheKey -> Uint8Array, or null for "known absent"
    this.objects = new Map(); // cacheKey -> the record deserialized, saving a parse per call
    this.loading = new Map(); // cacheKey -> Promise, so one record is loaded once at a time
  }

  /** The record as a libsignal object, parsed once and kept while its bytes stay current. */
  async getObject(kind, key, parse) {
    const ck = cacheKey(kind, key);
    const held = this.objects.get(ck);
    if (held !== undefined) {
      return held;
    }
    const bytes = await this.get(kind, key);
    if (bytes === null) {
      return null;
    }
    const parsed = parse(bytes);
    if (this.records.get(ck) === bytes) {
      this.objects.set(ck, parsed);
    }
    return parsed;
  }

  async get(kind, key) {
    const ck = cacheKey(kind, key);
    const held = this.records.get(ck);
    if (held !== undefined) {
      return held;
    }
    let pending = this.loading.get(ck);
    if (pending === undefined) {
      pending = this.load(kind, key, ck);
      this.loading.set(ck, pending);
    }
    return pending;
  }

  async load(kind, key, ck) {
    try {
      const value = await this.requestLoad(kind, key);
      // A call may have committed a newer copy while the load was on its way; that one wins,
      // because Python's durable copy lags behind until the caller commits the changes.
      const newer = this.records.get(ck);
      if (newer !== undefined) {
        return newer;
      }
      if (value !== null || REMEMBER_ABSENT.has(kind)) {
        this.records.set(ck, value);
      }
      return value;
    } finally {
      this.loading.delete(ck);
    }
  }

  commit(changes) {
    for (const change of changes) {
      const ck = cacheKey(change.kind, change.key);
      this.records.set(ck, change.value);
      if (change.object !== undefined && change.value !== null) {
        this.objects.set(ck, change.object);
      } else {
        this.objects.delete(ck);
      }
    }
  }

  evict(kind, key) {
    const ck = cacheKey(kind, key);
    this.records.delete(ck);
    this.objects.delete(ck);
  }

  clear() {
    this.records.clear();
    this.objects.clear();
  }
}

/** One call's view of the records: its own pending writes over the shared cache. */
export class CallRecords {
  constructor(cache) {
    this.cache = cache;
    this.writes = new Map(); // cacheKey -> {kind, key, value, object}
    this.events = [];
    this.refusedIdentity = null; // {peer, key}: the last identity key the trust policy refused
  }

  async getObject(kind, key, parse) {
    const own = this.writes.get(cacheKey(kind, key));
    if (own !== undefined) {
      return own.value === null ? null : (own.object ?? parse(own.value));
    }
    return this.cache.getObject(kind, key, parse);
  }

  async get(kind, key) {
    const own = this.writes.get(cacheKey(kind, key));
    if (own !== undefined) {
      return own.value;
    }
    return this.cache.get(kind, key);
  }

  put(kind, key, value, object = undefined) {
    this.writes.set(cacheKey(kind, key), { kind, key, value, object });
  }

  identityChanged(peer) {
    if (!this.events.some((e) => e.peer === peer)) {
      this.events.push({ type: 'identity_changed', peer });
    }
  }

  /** Copy the call's writes into the cache and return them as protocol `changes`. */
  commit() {
    const changes = [...this.writes.values()];
    this.cache.commit(changes);
    return changes;
  }
}

const parseSession = (bytes) => S.SessionRecord.deserialize(bytes);

export const sessionKey = (address) => `${address.name()}.${address.deviceId()}`;

async function required(records, kind, key) {
  const value = await records.get(kind, key);
  if (value === null) {
    throw new Error(`${MISSING_RECORD}: ${kind} ${key}`);
  }
  return value;
}

export class CallSessionStore extends S.SessionStore {
  constructor(records) {
    super();
    this.records = records;
  }

  async saveSession(address, record) {
    this.records.put('session', sessionKey(address), record.serialize(), record);
  }

  async getSession(address) {
    return this.records.getObject('session', sessionKey(address), parseSession);
  }

  async getExistingSessions(addresses) {
    const found = [];
    for (const address of addresses) {
      const value = await this.records.get('session', sessionKey(address));
      if (value === null) {
        throw new Error(`${MISSING_RECORD}: session ${sessionKey(address)}`);
      }
      found.push(S.SessionRecord.deserialize(value));
    }
    return found;
  }
}

/**
 * The local identity plus the peers' identity keys, with the trust policy applied.
 *
 * The `identity` record holds the key this wallet trusts for a peer; the `verified_identity`
 * record, written only by the wallet when its user runs `trust`, the key the user confirmed.
 * Policies:
 * - `always`: every key is trusted both ways; a different key replaces the stored one and
 *   emits identity_changed.
 * - `tofu`: the first key seen (either way) is trusted and stored. A different key is refused
 *   both ways (untrusted_identity), so neither a message from it is decrypted nor one to it
 *   encrypted, until the wallet stores the new key itself and evicts the cached copy.
 * - `verify`: as `tofu` for receiving (the first key seen may deliver, so an offer can arrive
 *   before the user has compared safety numbers); sending needs the key to equal the
 *   `verified_identity` record, even on first contact.
 * A refused key is kept on the call (`refusedIdentity`) so the error can name it: the wallet
 * remembers it as the newest key seen for the peer.
 */
export class CallIdentityStore extends S.IdentityKeyStore {
  constructor(records, local) {
    super();
    this.records = records;
    this.local = local;
  }

  async getIdentityKey() {
    return this.local.identityKeyPair.privateKey;
  }

  async getIdentityKeyPair() {
    return this.local.identityKeyPair;
  }

  async getLocalRegistrationId() {
    return this.local.registrationId;
  }

  async getIdentity(address) {
    const value = await this.records.get('identity', address.name());
    return value === null ? null : S.PublicKey.deserialize(value);
  }

  async isTrustedIdentity(address, key, direction) {
    const trusted = await this.trusts(address.name(), key.serialize(), direction);
    if (!trusted) {
      this.records.refusedIdentity = { peer: address.name(), key: key.serialize() };
    }
    return trusted;
  }

  async trusts(name, offered, direction) {
    const policy = this.local.trustPolicy;
    if (policy === 'always') {
      return true;
    }
    if (policy === 'verify' && direction === S.Direction.Sending) {
      const verified = await this.records.get('verified_identity', name);
      return verified !== null && sameBytes(verified, offered);
    }
    const stored = await this.records.get('identity', name);
    return stored === null || sameBytes(stored, offered);
  }

  async saveIdentity(address, key) {
    const name = address.name();
    const stored = await this.records.get('identity', name);
    const offered = key.serialize();
    if (stored === null) {
      this.records.put('identity', name, offered);
      return S.IdentityChange.NewOrUnchanged;
    }
    if (sameBytes(stored, offered)) {
      return S.IdentityChange.NewOrUnchanged;
    }
    // Only `always` gets here with a different key (the others refused it as untrusted); a
    // `verify` wallet whose user verified a key that differs from the stored one also does.
    this.records.identityChanged(name);
    this.records.put('identity', name, offered);
    return S.IdentityChange.ReplacedExisting;
  }
}

export class CallPreKeyStore extends S.PreKeyStore {
  constructor(records) {
    super();
    this.records = records;
  }

  async savePreKey(id, record) {
    this.records.put('prekey', String(id), record.serialize());
  }

  async getPreKey(id) {
    return S.PreKeyRecord.deserialize(await required(this.records, 'prekey', String(id)));
  }

  async removePreKey(id) {
    this.records.put('prekey', String(id), null);
  }
}

export class CallSignedPreKeyStore extends S.SignedPreKeyStore {
  constructor(records) {
    super();
    this.records = records;
  }

  async saveSignedPreKey(id, record) {
    this.records.put('signed_prekey', String(id), record.serialize());
  }

  async getSignedPreKey(id) {
    const value = await required(this.records, 'signed_prekey', String(id));
    return S.SignedPreKeyRecord.deserialize(value);
  }
}

/**
 * Kyber prekeys. A one-time key is deleted when used. The last-resort keys (ids named in `open`
 * as `lastResortKyberIds`) are kept, and each (kyber id, signed prekey id, base key) use is
 * recorded as a `kyber_used` record so the same PreKey message cannot set up a session twice.
 */
export class CallKyberPreKeyStore extends S.KyberPreKeyStore {
  constructor(records, local) {
    super();
    this.records = records;
    this.local = local;
  }

  async saveKyberPreKey(id, record) {
    this.records.put('kyber_prekey', String(id), record.serialize());
  }

  async getKyberPreKey(id) {
    const value = await required(this.records, 'kyber_prekey', String(id));
    return S.KyberPreKeyRecord.deserialize(value);
  }

  async markKyberPreKeyUsed(kyberId, signedPreKeyId, baseKey) {
    if (!this.local.lastResortKyberIds.has(kyberId)) {
      this.records.put('kyber_prekey', String(kyberId), null);
      return;
    }
    const base = Buffer.from(baseKey.serialize()).toString('base64');
    const useKey = `${kyberId}:${signedPreKeyId}:${base}`;
    if ((await this.records.get('kyber_used', useKey)) !== null) {
      throw new Error(KYBER_REPLAY);
    }
    this.records.put('kyber_used', useKey, new Uint8Array(0));
  }
}

function sameBytes(a, b) {
  return a.length === b.length && Buffer.compare(a, b) === 0;
}
