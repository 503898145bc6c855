//! Micro-benchmarks of the VerifyKey hot path's local work: `cargo bench --bench micro`.
//! Key parsing and checksum, keyed hashing, request decoding, the sliding-window arithmetic,
//! and (for CreateKey) drawing a key id in a shard.

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use sendable_keys::domain::key::{self, IssuedKey, KeyId};
use sendable_keys::domain::ratelimit::{WindowState, admit};
use sendable_keys::domain::{Environment, KeyHasher, Pepper};
use sendable_keys::grpc::pb;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut rng = rand::rng();
    let key = IssuedKey::generate(
        Environment::Live,
        KeyId::generate_in_shard(7, &mut rng),
        &mut rng,
    );
    let text = key.expose().to_owned();

    c.bench_function("parse + checksum a valid key", |b| {
        b.iter(|| key::parse(black_box(&text)).is_ok())
    });
    let typo = text.replacen('a', "b", 1);
    c.bench_function("reject a key with a bad checksum", |b| {
        b.iter(|| key::parse(black_box(&typo)).is_err())
    });
    let hasher = KeyHasher::new(&Pepper::new(vec![7; 32]).expect("pepper"));
    c.bench_function("keyed BLAKE3 hash of a key", |b| {
        b.iter(|| hasher.hash(black_box(&text)))
    });
    let request = pb::VerifyKeyRequest {
        key: text.clone(),
        expected_environment: pb::Environment::Live as i32,
        cost: 1,
    }
    .encode_to_vec();
    c.bench_function("decode a VerifyKeyRequest", |b| {
        b.iter(|| pb::VerifyKeyRequest::decode(black_box(&request[..])).is_ok())
    });
    let response = pb::VerifyKeyResponse {
        decision: pb::Decision::Valid as i32,
        valid: true,
        key_id: "AbCd1234".into(),
        session_id: "acme-prod".into(),
        environment: pb::Environment::Live as i32,
        plan: pb::Plan::Pro as i32,
        rate_limit: Some(pb::RateLimit {
            limit: 1000,
            remaining: 999,
            reset_after: Some(prost_types::Duration {
                seconds: 42,
                nanos: 0,
            }),
            retry_after: None,
        }),
    };
    c.bench_function("encode a VerifyKeyResponse", |b| {
        b.iter(|| black_box(&response).encode_to_vec())
    });
    let state = WindowState {
        window: 29_540_760,
        current: 30,
        previous: 45,
    };
    c.bench_function("sliding-window admission", |b| {
        b.iter(|| admit(black_box(state), black_box(1_772_445_617_000), 60, 1))
    });
    c.bench_function("mint a key (key id in a shard + secret + checksum)", |b| {
        b.iter(|| {
            let id = KeyId::generate_in_shard(black_box(513), &mut rng);
            IssuedKey::generate(Environment::Live, id, &mut rng)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
