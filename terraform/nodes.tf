# Nodes: an auto-scaling group over the node subnets, registered with every target group of
# the load balancer. Each has a public address too: clients are redirected to their user's
# node directly (advertise_host). A node's id, zone and addresses come from its instance
# metadata at each start (modules/user_data, instance-env.sh).

resource "aws_launch_template" "node" {
  #checkov:skip=CKV_AWS_88:Clients are redirected to their user's node directly (the protocol's Redirect and Migrate), so every node needs a public address; its security group opens only the client ports publicly.
  name                   = module.topology.names.node_template
  image_id               = local.ami_id
  instance_type          = var.node_instance_type
  user_data              = module.node_user_data.user_data_base64
  ebs_optimized          = true
  update_default_version = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  network_interfaces {
    associate_public_ip_address = true
    security_groups             = [aws_security_group.node.id]
    delete_on_termination       = true
  }

  metadata_options {
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    http_endpoint               = "enabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_type           = "gp3"
      volume_size           = var.node_root_volume_gib
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = { Name = module.topology.names.node_group, Role = "node" }
  }
}

resource "aws_autoscaling_group" "node" {
  name                      = module.topology.names.node_group
  min_size                  = module.topology.node_count.min
  max_size                  = module.topology.node_count.max
  desired_capacity          = module.topology.node_count.desired
  vpc_zone_identifier       = var.node_subnet_ids
  target_group_arns         = [for tg in aws_lb_target_group.node : tg.arn]
  health_check_type         = "ELB"
  health_check_grace_period = 600
  # SIGTERM on scale-in: the unit's graceful stop (GoingAway to every client). Drain a node
  # (`ctl drain N`) before you shrink the group, so its shards move first.
  default_instance_warmup = 300

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      # One node at a time: each replacement joins as a new node and is caught up.
      min_healthy_percentage = 100
      max_healthy_percentage = 110
      instance_warmup        = 300
    }
  }

  tag {
    key                 = "Name"
    value               = module.topology.names.node_group
    propagate_at_launch = true
  }
}
