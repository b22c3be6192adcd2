# Optional: the media bucket. Private, encrypted, TLS only; blobs (content-addressed,
# end-to-end encrypted) expire after media_expiry_days, and parts of uploads a node could not
# abort after a day. The nodes' own hourly sweep then finds nothing to delete.

resource "aws_s3_bucket" "media" {
  #checkov:skip=CKV_AWS_21:Blobs are content-addressed, never overwritten, and must be gone after their expiry; versioning would keep deleted ones as noncurrent versions.
  #checkov:skip=CKV_AWS_144:Media is end-to-end encrypted and lives 30 days; a lost region loses attachments, not messages. Replication would double the cost.
  #checkov:skip=CKV_AWS_145:SSE-S3 (AES256): the blobs are already end-to-end encrypted, and SSE-KMS would add a KMS request to every upload and download.
  #checkov:skip=CKV_AWS_18:Access logs would record every download's signed URL; the nodes' own metrics count media traffic. Turn on for an audit with your log bucket.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events: the nodes write and read blobs themselves.
  count         = var.media_bucket ? 1 : 0
  bucket        = local.media_bucket_name
  force_destroy = false
}

resource "aws_s3_bucket_public_access_block" "media" {
  count                   = var.media_bucket ? 1 : 0
  bucket                  = aws_s3_bucket.media[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "media" {
  count  = var.media_bucket ? 1 : 0
  bucket = aws_s3_bucket.media[0].id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "media" {
  count  = var.media_bucket ? 1 : 0
  bucket = aws_s3_bucket.media[0].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "media" {
  count  = var.media_bucket ? 1 : 0
  bucket = aws_s3_bucket.media[0].id

  rule {
    id     = "ringpost-media-expiry"
    status = "Enabled"
    filter {
      prefix = "blobs/"
    }
    expiration {
      days = var.media_expiry_days
    }
  }

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {
      prefix = "blobs/"
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "media_tls_only" {
  count = var.media_bucket ? 1 : 0
  statement {
    sid     = "DenyPlainHttp"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.media[0].arn,
      "${aws_s3_bucket.media[0].arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "media" {
  count  = var.media_bucket ? 1 : 0
  bucket = aws_s3_bucket.media[0].id
  policy = data.aws_iam_policy_document.media_tls_only[0].json
}
