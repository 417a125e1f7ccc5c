//go:build tools

// Package tools pins CoreDNS, the cluster DNS of the real node; nothing imports it.
package tools

import (
	_ "github.com/coredns/coredns"
)
