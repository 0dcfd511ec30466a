//! The S3 backend (aws-sdk-s3): AWS or any S3-compatible server. Every request's failure
//! is classified once, here, into the errors users act on (missing bucket, access denied,
//! no credentials) and the ones the transfer engine retries (timeouts, dropped
//! connections, 5xx, throttling). Multipart parts carry a CRC32 the server verifies.

use std::ops::Range;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use crate::{Body, Listing, ObjectMeta, ObjectStore, Part, StoreError};

/// One bucket of an S3 store.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Store {
    pub fn new(client: aws_sdk_s3::Client, bucket: &str) -> Self {
        S3Store {
            client,
            bucket: bucket.to_owned(),
        }
    }

    fn classify<E>(&self, context: String, key: &str, err: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = match &err {
            SdkError::ServiceError(e) => Some(status_of(e.raw())),
            _ => None,
        };
        let code = err.code().map(str::to_owned);
        let text = DisplayErrorContext(&err).to_string();
        let message = err
            .message()
            .map(str::to_owned)
            .unwrap_or_else(|| text.clone());
        match (code.as_deref(), status) {
            (Some("NoSuchBucket"), _) => StoreError::NoSuchBucket {
                bucket: self.bucket.clone(),
            },
            (Some("NoSuchKey"), _) | (_, Some(404)) => StoreError::NotFound {
                key: key.to_owned(),
            },
            (Some("PreconditionFailed"), _) | (_, Some(412)) => StoreError::Changed {
                key: key.to_owned(),
            },
            (
                Some(
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "AllAccessDisabled"
                    | "InvalidToken"
                    | "ExpiredToken",
                ),
                _,
            )
            | (_, Some(401 | 403)) => StoreError::AccessDenied {
                message: format!("{context}: {message}"),
            },
            (Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable"), _) => {
                StoreError::Service {
                    context,
                    message,
                    retryable: true,
                }
            }
            (_, Some(status)) => StoreError::Service {
                context,
                message: format!("{message} (HTTP {status})"),
                retryable: status >= 500 || status == 429,
            },
            (_, None) => {
                if text.contains("CredentialsNotLoaded") || text.contains("no credentials") {
                    StoreError::NoCredentials {
                        message: "none found in the environment, the AWS config files, SSO, or instance metadata".into(),
                    }
                } else {
                    // Timeouts, refused or dropped connections, malformed responses.
                    StoreError::Service {
                        context,
                        message: text,
                        retryable: !matches!(err, SdkError::ConstructionFailure(_)),
                    }
                }
            }
        }
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Sends a GET of `range` of `key` (all of it when `None`), pinned to `etag`.
    async fn send_get(
        &self,
        key: &str,
        range: Option<&Range<u64>>,
        etag: Option<&str>,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StoreError> {
        crate::validate_key(key)?;
        let mut req = self.client.get_object().bucket(&self.bucket).key(key);
        if let Some(range) = range {
            req = req.range(format!("bytes={}-{}", range.start, range.end - 1));
        }
        if let Some(etag) = etag {
            req = req.if_match(etag);
        }
        req.send()
            .await
            .map_err(|e| self.classify(format!("GET {}", self.url(key)), key, e))
    }

    /// A response body that ended early: retryable.
    fn cut_off(&self, key: &str, e: &dyn std::error::Error) -> StoreError {
        StoreError::Service {
            context: format!("GET {}", self.url(key)),
            message: format!("the body was cut off: {}", DisplayErrorContext(e)),
            retryable: true,
        }
    }

    /// A response of the wrong length: retryable.
    fn short(&self, key: &str, got: u64, want: u64) -> StoreError {
        StoreError::Service {
            context: format!("GET {}", self.url(key)),
            message: format!("got {got} bytes, expected {want}"),
            retryable: true,
        }
    }
}

/// How much of a download is gathered before one write to the file.
const WRITE_BATCH: u64 = 1 << 20;

fn status_of(raw: &HttpResponse) -> u16 {
    raw.status().as_u16()
}

fn millis(t: Option<&aws_sdk_s3::primitives::DateTime>) -> Option<i64> {
    t.and_then(|t| t.to_millis().ok())
}

impl S3Store {
    /// A URL anyone can GET `key` with until `ttl` has passed (SigV4 query signing), for
    /// hosts that have no credentials of their own yet (an instance's first boot).
    pub async fn presign_get(
        &self,
        key: &str,
        ttl: std::time::Duration,
    ) -> Result<String, StoreError> {
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl).map_err(|e| {
            StoreError::Service {
                context: format!("presigning {key}"),
                message: e.to_string(),
                retryable: false,
            }
        })?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| self.classify(format!("presigning {key}"), key, e))?;
        Ok(request.uri().to_owned())
    }
}

impl ObjectStore for S3Store {
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        crate::validate_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: out.content_length.unwrap_or(0).max(0) as u64,
                etag: out.e_tag,
                modified_ms: millis(out.last_modified.as_ref()),
            })),
            Err(err) => match self.classify(format!("HEAD {}", self.url(key)), key, err) {
                StoreError::NotFound { .. } => {
                    // A HEAD's 404 has no body: tell a missing object from a missing bucket.
                    match self.client.head_bucket().bucket(&self.bucket).send().await {
                        Ok(_) => Ok(None),
                        Err(err) => {
                            match self.classify(format!("HEAD bucket {}", self.bucket), key, err) {
                                StoreError::NotFound { .. } => Err(StoreError::NoSuchBucket {
                                    bucket: self.bucket.clone(),
                                }),
                                other => Err(other),
                            }
                        }
                    }
                }
                other => Err(other),
            },
        }
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        etag: Option<&str>,
    ) -> Result<Body, StoreError> {
        if range.as_ref().is_some_and(Range::is_empty) {
            return Ok(Body::default());
        }
        let out = self.send_get(key, range.as_ref(), etag).await?;
        let expected = out.content_length.map(|n| n.max(0) as u64);
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| self.cut_off(key, &e))?;
        let body = Body::from_chunks(body.into_segments().collect());
        let want = range.map(|r| r.end - r.start).or(expected);
        match want {
            Some(want) if body.len() != want => Err(self.short(key, body.len(), want)),
            _ => Ok(body),
        }
    }

    async fn get_into(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        file: std::sync::Arc<std::fs::File>,
        offset: u64,
    ) -> Result<u64, StoreError> {
        let want = range.end - range.start;
        if want == 0 {
            return Ok(0);
        }
        let mut out = self.send_get(key, Some(&range), etag).await?;
        // Write in pieces of about a megabyte: few system calls, little memory.
        let mut pending: Vec<Bytes> = Vec::new();
        let mut pending_len = 0u64;
        let mut written = 0u64;
        loop {
            let chunk = out
                .body
                .next()
                .await
                .transpose()
                .map_err(|e| self.cut_off(key, &e))?;
            let last = chunk.is_none();
            if let Some(chunk) = chunk {
                pending_len += chunk.len() as u64;
                pending.push(chunk);
            }
            if written + pending_len > want {
                break; // more than asked for: refused below
            }
            if pending_len >= WRITE_BATCH || (last && pending_len > 0) {
                let body = Body::from_chunks(std::mem::take(&mut pending));
                let (file, at) = (file.clone(), offset + written);
                crate::blocking(move || {
                    body.write_all_at(&file, at)
                        .map_err(StoreError::io("writing the download"))
                })
                .await?;
                written += pending_len;
                pending_len = 0;
            }
            if last {
                break;
            }
        }
        if written + pending_len != want {
            return Err(self.short(key, written + pending_len, want));
        }
        Ok(written)
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        crate::validate_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.classify(format!("PUT {}", self.url(key)), key, e))?;
        Ok(())
    }

    async fn create_upload(&self, key: &str) -> Result<String, StoreError> {
        crate::validate_key(key)?;
        let context = || format!("starting the upload of {}", self.url(key));
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| self.classify(context(), key, e))?;
        out.upload_id.ok_or_else(|| StoreError::Service {
            context: context(),
            message: "the answer had no upload id".into(),
            retryable: true,
        })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &str,
        number: u32,
        body: Bytes,
    ) -> Result<Part, StoreError> {
        let context = || format!("uploading part {number} of {}", self.url(key));
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload)
            .part_number(number as i32)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.classify(context(), key, e))?;
        Ok(Part {
            number,
            etag: out.e_tag.ok_or_else(|| StoreError::Service {
                context: context(),
                message: "the answer had no ETag".into(),
                retryable: true,
            })?,
            checksum_crc32: out.checksum_crc32,
        })
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload: &str,
        parts: Vec<Part>,
    ) -> Result<(), StoreError> {
        let parts = parts
            .into_iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number as i32)
                    .e_tag(p.etag)
                    .set_checksum_crc32(p.checksum_crc32)
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                self.classify(
                    format!("completing the upload of {}", self.url(key)),
                    key,
                    e,
                )
            })?;
        Ok(())
    }

    async fn abort_upload(&self, key: &str, upload: &str) -> Result<(), StoreError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                match self.classify(format!("aborting the upload of {}", self.url(key)), key, e) {
                    StoreError::NotFound { .. } => Ok(()),
                    other => Err(other),
                }
            }
        }
    }

    async fn list(&self, prefix: &str, delimited: bool) -> Result<Listing, StoreError> {
        let mut req = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix);
        if delimited {
            req = req.delimiter("/");
        }
        let mut pages = req.into_paginator().send();
        let mut listing = Listing::default();
        while let Some(page) = pages.next().await {
            let page = page
                .map_err(|e| self.classify(format!("listing {}", self.url(prefix)), prefix, e))?;
            for object in page.contents.unwrap_or_default() {
                let Some(key) = object.key else { continue };
                listing.objects.push(ObjectMeta {
                    key,
                    size: object.size.unwrap_or(0).max(0) as u64,
                    etag: object.e_tag,
                    modified_ms: millis(object.last_modified.as_ref()),
                });
            }
            listing.prefixes.extend(
                page.common_prefixes
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| p.prefix),
            );
        }
        listing.objects.sort_by(|a, b| a.key.cmp(&b.key));
        listing.prefixes.sort();
        Ok(listing)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        crate::validate_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.classify(format!("DELETE {}", self.url(key)), key, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}
