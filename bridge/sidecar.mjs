// tigress-signal's libsignal sidecar: newline-delimited JSON-RPC over stdin/stdout, a line
// optionally followed by binary blobs (message and record bytes, without base64).
//
// The protocol is described in docs/architecture.md ("Sidecar protocol"). In short: Python sends
// requests, the sidecar answers them (possibly out of order), and asks Python for records it
// does not hold with `load` requests of its own. stdout carries protocol lines only; diagnostics
// go to stderr and never contain key material. The sidecar exits when stdin closes.

import { randomInt } from 'node:crypto';
import { writevSync } from 'node:fs';
import { createRequire } from 'node:module';
import process from 'node:process';

import * as S from '@signalapp/libsignal-client';

import {
  CallIdentityStore,
  CallKyberPreKeyStore,
  CallPreKeyStore,
  CallRecords,
  CallSessionStore,
  CallSignedPreKeyStore,
  KYBER_REPLAY,
  LOAD_FAILED,
  MISSING_RECORD,
  RecordCache,
} from './stores.mjs';

const require = createRequire(import.meta.url);
const LIBSIGNAL_VERSION = require('@signalapp/libsignal-client/package.json').version;
const FINGERPRINT_ITERATIONS = 5200;
const MAX_REGISTRATION_ID = 0x3fff;
const MAX_KEY_ID = 0x7fffffff;
const MAX_BATCH = 1000;
const TRUST_POLICIES = new Set(['tofu', 'always', 'verify']);
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

// -- output: protocol lines, written once the current burst of work settles -------------------

let outbox = []; // Buffers: each message's line, then its blobs
let flushQueued = false;

/** Queue one message; `blobs` (byte arrays) follow its line, their lengths listed in it. */
function send(message, blobs = null) {
  if (blobs !== null) {
    message.blobs = blobs.map((b) => b.byteLength);
  }
  outbox.push(Buffer.from(JSON.stringify(message) + '\n'));
  if (blobs !== null) {
    for (const blob of blobs) {
      outbox.push(blob);
    }
  }
  if (!flushQueued) {
    flushQueued = true;
    queueMicrotask(flush);
  }
}

/** Write the outbox with one system call; what the pipe does not take goes through the stream. */
function flush() {
  flushQueued = false;
  if (outbox.length === 0) {
    return;
  }
  const parts = outbox;
  outbox = [];
  if (process.stdout.writableLength > 0) {
    writeStream(parts); // earlier output still waits in the stream: keep the order
    return;
  }
  let written = 0;
  try {
    written = writevSync(1, parts);
  } catch (err) {
    if (err.code !== 'EAGAIN') {
      process.exit(0); // Python has gone (EPIPE): nobody is left to answer
    }
  }
  const total = parts.reduce((sum, part) => sum + part.byteLength, 0);
  if (written < total) {
    writeStream([Buffer.concat(parts).subarray(written)]);
  }
}

function writeStream(parts) {
  process.stdout.write(parts.length === 1 ? parts[0] : Buffer.concat(parts));
}

function diagnose(text) {
  process.stderr.write(`[sidecar] ${text}\n`);
}

// -- record loads from Python ----------------------------------------------------------------

let nextLoadId = 1;
const pendingLoads = new Map();

function requestLoad(kind, key) {
  const id = `L${nextLoadId++}`;
  return new Promise((resolve, reject) => {
    pendingLoads.set(id, { resolve, reject });
    send({ id, method: 'load', params: { kind, key } });
  });
}

function answerLoad(message) {
  const waiter = pendingLoads.get(message.id);
  if (waiter === undefined) {
    diagnose(`answer to unknown load ${message.id}`);
    return;
  }
  pendingLoads.delete(message.id);
  if (message.error || !message.result) {
    waiter.reject(new Error(LOAD_FAILED));
    return;
  }
  const value = message.result.value;
  if (value === null || value === undefined) {
    waiter.resolve(null);
  } else if (typeof value === 'string') {
    waiter.resolve(fromBase64(value));
  } else if (Number.isInteger(value) && message.blobs?.[value] !== undefined) {
    waiter.resolve(message.blobs[value]);
  } else {
    waiter.reject(new Error(LOAD_FAILED));
  }
}

const cache = new RecordCache(requestLoad);

// -- the local identity, set by `open` ---------------------------------------------------------

let local = null;

// -- serialization: one call at a time per peer; PreKey messages one at a time overall ----------

const tails = new Map();

function serialized(lane, work) {
  const previous = tails.get(lane) ?? Promise.resolve();
  const run = previous.then(() => work());
  const tail = run.then(
    () => undefined,
    () => undefined,
  );
  tails.set(lane, tail);
  tail.then(() => {
    if (tails.get(lane) === tail) {
      tails.delete(lane);
    }
  });
  return run;
}

// -- methods -------------------------------------------------------------------------------

class BadRequest extends Error {}

const methods = {
  async ping() {
    return { libsignalVersion: LIBSIGNAL_VERSION, pid: process.pid };
  },

  async generateIdentity() {
    const pair = S.IdentityKeyPair.generate();
    return {
      identityKeyPair: toBase64(pair.serialize()),
      publicKey: toBase64(pair.publicKey.serialize()),
      registrationId: randomInt(1, MAX_REGISTRATION_ID + 1),
    };
  },

  async open(params) {
    const identityBytes = bytesParam(params, 'identityKeyPair');
    const registrationId = intParam(params, 'registrationId', 1, MAX_REGISTRATION_ID);
    const trustPolicy = params.trustPolicy ?? 'tofu';
    if (!TRUST_POLICIES.has(trustPolicy)) {
      throw new BadRequest(`unknown trustPolicy ${JSON.stringify(trustPolicy)}`);
    }
    const lastResort = params.lastResortKyberIds ?? [];
    if (!Array.isArray(lastResort) || !lastResort.every((id) => Number.isInteger(id))) {
      throw new BadRequest('lastResortKyberIds must be a list of integers');
    }
    let identityKeyPair;
    try {
      identityKeyPair = S.IdentityKeyPair.deserialize(identityBytes);
    } catch {
      throw new BadRequest('identityKeyPair is not a serialized IdentityKeyPair');
    }
    // Another identity means other records: drop every working copy.
    if (local === null || !sameBytes(local.identityBytes, identityBytes)) {
      cache.clear();
    }
    local = {
      identityBytes,
      identityKeyPair,
      registrationId,
      address: addressParam(params),
      trustPolicy,
      lastResortKyberIds: new Set(lastResort),
    };
    return {};
  },

  async generatePreKeys(params) {
    requireOpen();
    const startId = intParam(params, 'startId', 1, MAX_KEY_ID);
    const count = intParam(params, 'count', 1, MAX_BATCH);
    checkIdRange(startId, count);
    const preKeys = [];
    for (let keyId = startId; keyId < startId + count; keyId++) {
      const privateKey = S.PrivateKey.generate();
      const publicKey = privateKey.getPublicKey();
      const record = S.PreKeyRecord.new(keyId, publicKey, privateKey);
      cache.evict('prekey', String(keyId));
      preKeys.push({
        keyId,
        publicKey: toBase64(publicKey.serialize()),
        record: toBase64(record.serialize()),
      });
    }
    return { preKeys };
  },

  async generateSignedPreKey(params) {
    const me = requireOpen();
    const keyId = intParam(params, 'keyId', 1, MAX_KEY_ID);
    const timestamp = intParam(params, 'timestamp', 0, Number.MAX_SAFE_INTEGER);
    const privateKey = S.PrivateKey.generate();
    const publicKey = privateKey.getPublicKey();
    const signature = me.identityKeyPair.privateKey.sign(publicKey.serialize());
    const record = S.SignedPreKeyRecord.new(keyId, timestamp, publicKey, privateKey, signature);
    cache.evict('signed_prekey', String(keyId));
    return {
      keyId,
      publicKey: toBase64(publicKey.serialize()),
      signature: toBase64(signature),
      record: toBase64(record.serialize()),
    };
  },

  async generateKyberPreKeys(params) {
    const me = requireOpen();
    const startId = intParam(params, 'startId', 1, MAX_KEY_ID);
    const count = intParam(params, 'count', 1, MAX_BATCH);
    const timestamp = intParam(params, 'timestamp', 0, Number.MAX_SAFE_INTEGER);
    checkIdRange(startId, count);
    const pqPreKeys = [];
    for (let keyId = startId; keyId < startId + count; keyId++) {
      const keyPair = S.KEMKeyPair.generate();
      const publicKey = keyPair.getPublicKey().serialize();
      const signature = me.identityKeyPair.privateKey.sign(publicKey);
      const record = S.KyberPreKeyRecord.new(keyId, timestamp, keyPair, signature);
      cache.evict('kyber_prekey', String(keyId));
      pqPreKeys.push({
        keyId,
        publicKey: toBase64(publicKey),
        signature: toBase64(signature),
        record: toBase64(record.serialize()),
      });
    }
    return { pqPreKeys };
  },

  async processPreKeyBundle(params, out) {
    const me = requireOpen();
    const address = addressParam(params);
    const bundle = bundleParam(params.bundle);
    return serialized(`peer:${address.name()}`, () =>
      withCallStores(me, out, async (stores) => {
        await S.processPreKeyBundle(bundle, address, me.address, stores.session, stores.identity);
        return {};
      }),
    );
  },

  async encrypt(params, out) {
    const me = requireOpen();
    const address = addressParam(params);
    const plaintext = bytesParam(params, 'plaintext');
    return serialized(`peer:${address.name()}`, () =>
      withCallStores(me, out, async (stores) => {
        const message = await S.signalEncrypt(
          plaintext,
          address,
          me.address,
          stores.session,
          stores.identity,
        );
        return { type: message.type(), ciphertext: bytesOut(out, message.serialize()) };
      }),
    );
  },

  async decrypt(params, out) {
    const me = requireOpen();
    const address = addressParam(params);
    const type = params.type;
    const ciphertext = bytesParam(params, 'ciphertext');
    if (type === S.CiphertextMessageType.Whisper) {
      return serialized(`peer:${address.name()}`, () =>
        withCallStores(me, out, async (stores) => {
          const message = S.SignalMessage.deserialize(ciphertext);
          const plaintext = await S.signalDecrypt(
            message,
            address,
            me.address,
            stores.session,
            stores.identity,
          );
          return { plaintext: bytesOut(out, plaintext) };
        }),
      );
    }
    if (type === S.CiphertextMessageType.PreKey) {
      // PreKey messages share the prekey stores across peers: one at a time, so two senders
      // can never both consume the same one-time prekey.
      return serialized(`peer:${address.name()}`, () =>
        serialized('prekeys', () =>
          withCallStores(me, out, async (stores) => {
            const message = S.PreKeySignalMessage.deserialize(ciphertext);
            const plaintext = await S.signalDecryptPreKey(
              message,
              address,
              me.address,
              stores.session,
              stores.identity,
              stores.preKey,
              stores.signedPreKey,
              stores.kyberPreKey,
            );
            return { plaintext: bytesOut(out, plaintext) };
          }),
        ),
      );
    }
    throw new BadRequest('type must be 2 (Whisper) or 3 (PreKey)');
  },

  // A decryption-error message about a message this wallet could not decrypt, wrapped in a
  // PlaintextContent for the intermediary (envelope type 8). Only Whisper and PreKey messages
  // qualify: the error carries their sender ratchet key, which tells the original sender
  // whether its current session is the one that broke.
  async decryptionError(params, out) {
    const original = bytesParam(params, 'ciphertext');
    const type = params.type;
    if (type !== S.CiphertextMessageType.Whisper && type !== S.CiphertextMessageType.PreKey) {
      throw new BadRequest('type must be 2 (Whisper) or 3 (PreKey)');
    }
    const timestamp = intParam(params, 'timestamp', 0, Number.MAX_SAFE_INTEGER);
    const senderDeviceId = intParam(params, 'senderDeviceId', 1, 127);
    const error = S.DecryptionErrorMessage.forOriginal(original, type, timestamp, senderDeviceId);
    return { content: bytesOut(out, S.PlaintextContent.from(error).serialize()) };
  },

  // Read a decryption-error message a peer's device sent (PlaintextContent bytes), and say
  // whether this wallet's current session with that device is the one that broke: there is
  // none, or the error's ratchet key is the session's current one. Changes nothing.
  async readDecryptionError(params, out) {
    const me = requireOpen();
    const address = addressParam(params);
    const content = bytesParam(params, 'content');
    return serialized(`peer:${address.name()}`, () =>
      withCallStores(me, out, async (stores) => {
        const plaintext = S.PlaintextContent.deserialize(content);
        const error = S.DecryptionErrorMessage.extractFromSerializedBody(plaintext.body());
        const ratchetKey = error.ratchetKey() ?? null;
        const session = await stores.session.getSession(address);
        let currentSessionBroken;
        if (session === null || !session.hasCurrentState()) {
          currentSessionBroken = true;
        } else {
          currentSessionBroken = ratchetKey !== null && session.currentRatchetKeyMatches(ratchetKey);
        }
        return {
          timestamp: error.timestamp(),
          deviceId: error.deviceId(),
          ratchetKey: ratchetKey === null ? null : bytesOut(out, ratchetKey.serialize()),
          currentSessionBroken,
        };
      }),
    );
  },

  async safetyNumber(params) {
    const localId = stringParam(params, 'localId');
    const remoteId = stringParam(params, 'remoteId');
    const localKey = publicKeyParam(params, 'localKey');
    const remoteKey = publicKeyParam(params, 'remoteKey');
    // Signal's current form: both ids as 16-byte UUIDs, version 2. Ids that are not UUIDs
    // (tests, other deployments) fall back to version 1 over their UTF-8 text.
    const asUuids = UUID_RE.test(localId) && UUID_RE.test(remoteId);
    const encode = asUuids ? uuidBytes : (text) => new Uint8Array(Buffer.from(text, 'utf8'));
    const fingerprint = S.Fingerprint.new(
      FINGERPRINT_ITERATIONS,
      asUuids ? 2 : 1,
      encode(localId),
      localKey,
      encode(remoteId),
      remoteKey,
    );
    return {
      digits: fingerprint.displayableFingerprint().toString(),
      scannable: toBase64(fingerprint.scannableFingerprint().toBuffer()),
    };
  },

  async verifySignature(params) {
    const publicKey = publicKeyParam(params, 'publicKey');
    const message = bytesParam(params, 'message');
    const signature = bytesParam(params, 'signature');
    let valid;
    try {
      valid = publicKey.verify(message, signature);
    } catch {
      valid = false;
    }
    return { valid };
  },

  async evict(params) {
    if (!Array.isArray(params.records)) {
      throw new BadRequest('records must be a list of {kind, key}');
    }
    for (const record of params.records) {
      if (typeof record?.kind !== 'string' || typeof record?.key !== 'string') {
        throw new BadRequest('records must be a list of {kind, key}');
      }
      cache.evict(record.kind, record.key);
    }
    return {};
  },
};

/** Run one libsignal operation on fresh per-call stores; commit its writes only on success. */
async function withCallStores(me, out, operation) {
  const records = new CallRecords(cache);
  const stores = {
    session: new CallSessionStore(records),
    identity: new CallIdentityStore(records, me),
    preKey: new CallPreKeyStore(records),
    signedPreKey: new CallSignedPreKeyStore(records),
    kyberPreKey: new CallKyberPreKeyStore(records, me),
  };
  let result;
  try {
    result = await operation(stores);
  } catch (err) {
    // The key the trust policy refused travels with the error, so the wallet can remember it
    // as the newest key seen for the peer and show its safety number.
    if (records.refusedIdentity !== null && err !== null && typeof err === 'object') {
      err.refusedIdentity = records.refusedIdentity;
    }
    throw err;
  }
  const changes = records.commit().map((c) => ({
    kind: c.kind,
    key: c.key,
    value: c.value === null ? null : bytesOut(out, c.value),
  }));
  return { ...result, changes, events: records.events };
}

// -- parameters ------------------------------------------------------------------------------

function requireOpen() {
  if (local === null) {
    throw new BadRequest('call open first');
  }
  return local;
}

function intParam(params, name, min, max) {
  const value = params[name];
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new BadRequest(`${name} must be an integer in ${min}..${max}`);
  }
  return value;
}

function stringParam(params, name) {
  const value = params[name];
  if (typeof value !== 'string' || value.length === 0) {
    throw new BadRequest(`${name} must be a non-empty string`);
  }
  return value;
}

function bytesParam(params, name) {
  const value = params?.[name];
  if (typeof value === 'string') {
    return fromBase64(value);
  }
  if (Number.isInteger(value) && requestBlobs?.[value] !== undefined) {
    return requestBlobs[value];
  }
  throw new BadRequest(`${name} must be base64 text or the index of one of the request's blobs`);
}

/** A byte field of an answer: a blob when the request came with blobs, else base64 text. */
function bytesOut(out, bytes) {
  if (out === null) {
    return toBase64(bytes);
  }
  out.push(bytes);
  return out.length - 1;
}

function publicKeyParam(params, name) {
  try {
    return S.PublicKey.deserialize(bytesParam(params, name));
  } catch (err) {
    if (err instanceof BadRequest) {
      throw err;
    }
    throw new BadRequest(`${name} is not a serialized public key`);
  }
}

function addressParam(params) {
  const address = params.address;
  if (typeof address !== 'object' || address === null) {
    throw new BadRequest('address must be {name, deviceId}');
  }
  const name = stringParam(address, 'name');
  const deviceId = intParam(address, 'deviceId', 1, 127);
  return S.ProtocolAddress.new(name, deviceId);
}

function bundleParam(bundle) {
  if (typeof bundle !== 'object' || bundle === null) {
    throw new BadRequest('bundle must be an object');
  }
  const signed = bundle.signedPreKey ?? {};
  const pq = bundle.pqPreKey ?? {};
  const one = bundle.preKey ?? null;
  try {
    return S.PreKeyBundle.new(
      intParam(bundle, 'registrationId', 0, MAX_KEY_ID),
      intParam(bundle, 'deviceId', 1, 127),
      one === null ? null : intParam(one, 'keyId', 0, MAX_KEY_ID),
      one === null ? null : publicKeyParam(one, 'publicKey'),
      intParam(signed, 'keyId', 0, MAX_KEY_ID),
      publicKeyParam(signed, 'publicKey'),
      bytesParam(signed, 'signature'),
      publicKeyParam(bundle, 'identityKey'),
      intParam(pq, 'keyId', 0, MAX_KEY_ID),
      S.KEMPublicKey.deserialize(bytesParam(pq, 'publicKey')),
      bytesParam(pq, 'signature'),
    );
  } catch (err) {
    if (err instanceof BadRequest) {
      throw err;
    }
    throw new BadRequest(`bundle does not parse: ${err.message}`);
  }
}

function checkIdRange(startId, count) {
  if (startId + count - 1 > MAX_KEY_ID) {
    throw new BadRequest(`key ids ${startId}+${count} run past ${MAX_KEY_ID}`);
  }
}

// -- errors ------------------------------------------------------------------------------------

/** Map an exception to the protocol's error `kind`: libsignal's code first, then its text. */
function classify(err) {
  if (err instanceof BadRequest) {
    return 'bad_request';
  }
  const message = String(err?.message ?? err);
  const code = err instanceof S.LibSignalErrorBase ? err.code : null;
  switch (code) {
    case S.ErrorCode.DuplicatedMessage:
      return 'duplicate_message';
    case S.ErrorCode.UntrustedIdentity:
      return 'untrusted_identity';
    case S.ErrorCode.InvalidProtocolAddress:
      return 'bad_request';
    case S.ErrorCode.InvalidSession:
      return 'invalid_message';
    default:
      break;
  }
  if (message.includes(LOAD_FAILED)) {
    return 'internal';
  }
  if (message.includes(KYBER_REPLAY)) {
    return 'duplicate_message';
  }
  if (/session with .* not found/.test(message) || /no session/i.test(message)) {
    return 'no_session';
  }
  if (message.includes('invalid signature')) {
    return 'invalid_signature';
  }
  if (
    message.includes(MISSING_RECORD) ||
    /invalid (signed |Kyber )?prekey identifier/i.test(message) ||
    /method call 'load(Pre|SignedPre|KyberPre)Key'/.test(message)
  ) {
    return 'unknown_prekey';
  }
  if (
    /^invalid .*message/i.test(message) ||
    /too short|protobuf|bad key type|unrecognized message version|bad mac|decryption failed/i.test(
      message,
    )
  ) {
    return 'invalid_message';
  }
  if (code !== null) {
    return 'invalid_message';
  }
  return 'internal';
}

function errorAnswer(err, params) {
  const kind = classify(err);
  const peer = typeof params?.address?.name === 'string' ? params.address.name : null;
  let message = String(err?.message ?? err);
  if (kind === 'internal') {
    // An unexpected failure: keep its text short and say so on stderr without any key bytes.
    diagnose(`internal error: ${message.split('\n')[0].slice(0, 300)}`);
  }
  if (message.length > 500) {
    message = message.slice(0, 500);
  }
  const answer = {
    kind,
    message,
    code: err instanceof S.LibSignalErrorBase ? err.code : null,
    peer,
  };
  if (kind === 'untrusted_identity' && err?.refusedIdentity !== undefined) {
    // A public key, not a secret: the peer publishes it with every bundle.
    answer.identityKey = toBase64(err.refusedIdentity.key);
  }
  return answer;
}

// -- input -------------------------------------------------------------------------------------

// The blobs of the request being parsed. Methods read their byte parameters before their first
// `await`, so this is only set while handleRequest runs a method's synchronous part.
let requestBlobs = null;

async function handleRequest(message) {
  const { id, method } = message;
  const params = message.params ?? {};
  const run = Object.hasOwn(methods, method) ? methods[method] : null;
  if (run === null) {
    send({ id, error: errorAnswer(new BadRequest(`unknown method ${method}`), params) });
    return;
  }
  // A request with blobs gets the byte fields of its answer as blobs too.
  const out = message.blobs === undefined ? null : [];
  try {
    let running;
    requestBlobs = message.blobs ?? null;
    try {
      running = run(params, out);
    } finally {
      requestBlobs = null;
    }
    const result = await running;
    send({ id, result }, out !== null && out.length > 0 ? out : null);
  } catch (err) {
    send({ id, error: errorAnswer(err, params) });
  }
}

function handleMessage(message) {
  if (typeof message.id === 'string' && message.method === undefined) {
    answerLoad(message);
  } else if (typeof message.method === 'string') {
    handleRequest(message);
  } else {
    diagnose('dropped a line that is neither a request nor a load answer');
  }
}

/** The byte count of the blobs a message announces, or -1 when its `blobs` is malformed. */
function blobsSize(message) {
  const blobs = message.blobs;
  if (blobs === undefined) {
    return 0;
  }
  if (!Array.isArray(blobs)) {
    return -1;
  }
  let size = 0;
  for (const length of blobs) {
    if (!Number.isInteger(length) || length < 0) {
      return -1;
    }
    size += length;
  }
  return size;
}

// Input: a line of JSON, then the bytes of the blobs it announces, if any.
let chunks = []; // input not yet parsed; joined once it holds a whole line or all awaited blobs
let chunksSize = 0;
let awaiting = null; // {message, size}: a parsed line waiting for the bytes of its blobs

function takeBlobs(bytes, start) {
  const { message } = awaiting;
  awaiting = null;
  const blobs = [];
  let at = start;
  for (const length of message.blobs) {
    blobs.push(new Uint8Array(bytes.buffer, bytes.byteOffset + at, length));
    at += length;
  }
  message.blobs = blobs;
  handleMessage(message);
  return at;
}

process.stdin.on('data', (chunk) => {
  chunks.push(chunk);
  chunksSize += chunk.length;
  if (awaiting !== null ? chunksSize < awaiting.size : chunk.indexOf(10) === -1) {
    return;
  }
  const bytes = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, chunksSize);
  chunks = [];
  chunksSize = 0;
  let start = 0;
  for (;;) {
    if (awaiting !== null) {
      if (bytes.length - start < awaiting.size) {
        break;
      }
      start = takeBlobs(bytes, start);
      continue;
    }
    const end = bytes.indexOf(10, start);
    if (end === -1) {
      break;
    }
    const line = bytes.toString('utf8', start, end);
    start = end + 1;
    if (line.length === 0) {
      continue;
    }
    let message;
    try {
      message = JSON.parse(line);
    } catch {
      diagnose('dropped a line that is not JSON');
      continue;
    }
    const size = blobsSize(message);
    if (size < 0) {
      diagnose('dropped a line whose blobs are not a list of lengths');
    } else if (message.blobs === undefined) {
      handleMessage(message);
    } else {
      awaiting = { message, size };
    }
  }
  if (start < bytes.length) {
    chunks.push(bytes.subarray(start));
    chunksSize = bytes.length - start;
  }
});
process.stdin.on('end', () => {
  flush();
  process.exit(0);
});
process.stdout.on('error', () => process.exit(0));

// -- small pieces --------------------------------------------------------------------------------

function fromBase64(text) {
  return new Uint8Array(Buffer.from(text, 'base64'));
}

function toBase64(bytes) {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
}

function sameBytes(a, b) {
  return a.length === b.length && Buffer.compare(a, b) === 0;
}

function uuidBytes(text) {
  return new Uint8Array(Buffer.from(text.replaceAll('-', ''), 'hex'));
}
