# Instance roles with only what each role reads: its SSM parameters (the cluster secret; for
# nodes also the TLS files and the SMS token) and, for nodes, the media bucket's objects.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "node" {
  statement {
    sid       = "ReadOwnParameters"
    actions   = ["ssm:GetParameter"]
    resources = values(local.parameter_arn)
  }
  dynamic "statement" {
    for_each = var.ssm_kms_key_arn != "" ? [1] : []
    content {
      sid       = "DecryptParameters"
      actions   = ["kms:Decrypt"]
      resources = [var.ssm_kms_key_arn]
    }
  }
  dynamic "statement" {
    for_each = var.media_bucket ? [1] : []
    content {
      sid = "MediaObjects"
      actions = [
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
        "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
      ]
      resources = ["${aws_s3_bucket.media[0].arn}/blobs/*"]
    }
  }
  dynamic "statement" {
    for_each = var.media_bucket ? [1] : []
    content {
      # The expiry sweep lists blobs/ (the lifecycle rule does the real work).
      sid       = "MediaList"
      actions   = ["s3:ListBucket"]
      resources = [aws_s3_bucket.media[0].arn]
      condition {
        test     = "StringLike"
        variable = "s3:prefix"
        values   = ["blobs/*"]
      }
    }
  }
}

data "aws_iam_policy_document" "coordinator" {
  statement {
    sid       = "ReadClusterSecret"
    actions   = ["ssm:GetParameter"]
    resources = [local.parameter_arn[var.ssm_parameters.cluster_secret]]
  }
  dynamic "statement" {
    for_each = var.ssm_kms_key_arn != "" ? [1] : []
    content {
      sid       = "DecryptParameters"
      actions   = ["kms:Decrypt"]
      resources = [var.ssm_kms_key_arn]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = module.topology.names.node_role
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "node" {
  name   = "ringpost-node"
  role   = aws_iam_role.node.id
  policy = data.aws_iam_policy_document.node.json
}

resource "aws_iam_instance_profile" "node" {
  name = module.topology.names.node_role
  role = aws_iam_role.node.name
}

resource "aws_iam_role" "coordinator" {
  name               = module.topology.names.coordinator_role
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "coordinator" {
  name   = "ringpost-coordinator"
  role   = aws_iam_role.coordinator.id
  policy = data.aws_iam_policy_document.coordinator.json
}

resource "aws_iam_instance_profile" "coordinator" {
  name = module.topology.names.coordinator_role
  role = aws_iam_role.coordinator.name
}

resource "aws_iam_role_policy_attachment" "session_manager" {
  for_each   = var.ssm_session_manager ? { node = aws_iam_role.node.name, coordinator = aws_iam_role.coordinator.name } : {}
  role       = each.value
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}
