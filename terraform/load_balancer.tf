# A network load balancer in the node subnets: the listeners of modules/topology (TCP for ws
# and wss, UDP for QUIC, one TCP_UDP listener when wss and QUIC share a port, TLS for media).
# It keeps clients' addresses (instance targets), which the nodes' per-source limits need.
# Health: GET /readyz on the admin port (ready = an active member serving its shards).

resource "aws_lb" "node" {
  name                             = module.topology.names.nlb
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = var.node_subnet_ids
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.lb_deletion_protection

  dynamic "access_logs" {
    for_each = var.lb_access_logs_bucket != "" ? [1] : []
    content {
      bucket  = var.lb_access_logs_bucket
      prefix  = var.name
      enabled = true
    }
  }
}

resource "aws_lb_target_group" "node" {
  for_each             = module.topology.listeners
  name                 = module.topology.target_group_names[each.key]
  port                 = each.value.target_port
  protocol             = each.value.target_protocol
  vpc_id               = var.vpc_id
  target_type          = "instance"
  preserve_client_ip   = true
  deregistration_delay = 30
  # Long-lived connections stay on their node when it leaves; the node itself sends them
  # GoingAway.
  connection_termination = false

  health_check {
    protocol            = "HTTP"
    port                = tostring(module.topology.ports.admin)
    path                = "/readyz"
    interval            = 10
    healthy_threshold   = 3
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "node" {
  #checkov:skip=CKV_AWS_2:A network load balancer passing TCP and UDP through: the nodes terminate TLS themselves (wss, and QUIC, which cannot be terminated here).
  #checkov:skip=CKV_AWS_103:TCP and UDP listeners carry the nodes' own TLS; the one TLS listener (media) uses ELBSecurityPolicy-TLS13-1-2-2021-06.
  for_each          = module.topology.listeners
  load_balancer_arn = aws_lb.node.arn
  port              = each.value.port
  protocol          = each.value.protocol
  certificate_arn   = each.value.protocol == "TLS" ? var.media_certificate_arn : null
  ssl_policy        = each.value.protocol == "TLS" ? "ELBSecurityPolicy-TLS13-1-2-2021-06" : null

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.node[each.key].arn
  }
}
