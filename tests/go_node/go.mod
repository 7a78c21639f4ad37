module vmafx.test/go_node

go 1.19
