# One instance per replica, each in its own zone at a fixed private address (modules/topology)
# so that nodes, `ctl` and the other replicas find it after a replacement; the Raft log on
# its own EBS volume, which outlives the instance.

resource "aws_ebs_volume" "coordinator" {
  #checkov:skip=CKV_AWS_189:Encrypted with the AWS-managed aws/ebs key; a customer-managed key needs key-policy grants this module does not manage.
  for_each          = local.coordinator_volumes
  availability_zone = each.value.az
  size              = var.coordinator_volume_gib
  type              = "gp3"
  encrypted         = true
  tags              = { Name = "${each.value.name}-data" }
}

resource "aws_instance" "coordinator" {
  for_each               = local.coordinator_volumes
  ami                    = local.ami_id
  instance_type          = var.coordinator_instance_type
  subnet_id              = each.value.subnet_id
  private_ip             = each.value.private_ip
  vpc_security_group_ids = [aws_security_group.coordinator.id]
  iam_instance_profile   = aws_iam_instance_profile.coordinator.name
  user_data_base64       = module.coordinator_user_data[each.key].user_data_base64
  ebs_optimized          = true
  monitoring             = true

  metadata_options {
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    http_endpoint               = "enabled"
  }

  root_block_device {
    volume_type = "gp3"
    volume_size = 16
    encrypted   = true
  }

  tags = { Name = each.value.name, Role = "coordinator", ReplicaId = tostring(each.value.replica_id) }

  lifecycle {
    # A new AMI or user-data must not replace a replica behind the operator's back: replace
    # one at a time (`terraform apply -replace=...`), waiting for it to rejoin.
    ignore_changes = [ami, user_data_base64]
  }
}

resource "aws_volume_attachment" "coordinator" {
  for_each    = local.coordinator_volumes
  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.coordinator[each.key].id
  instance_id = aws_instance.coordinator[each.key].id
}
